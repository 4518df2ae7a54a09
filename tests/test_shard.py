from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir
from hpcrollout.schema import ROW, UID
from hpcrollout.shard import plan_shards, prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input


def test_plan_balances_work_not_rows():
    work = np.array([100.0] * 10 + [1.0] * 90)
    ranges = plan_shards(work, 2, 10_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    sums = [work[a:b].sum() for a, b in ranges]
    assert max(sums) / min(sums) < 1.25
    assert ranges[0][1] - ranges[0][0] < 20  # the heavy rows get a short shard


def test_plan_caps_rows_and_covers_everything():
    work = np.ones(1000)
    ranges = plan_shards(work, 3, 100)
    assert len(ranges) == 10 and all(b - a <= 100 for a, b in ranges)
    assert ranges[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:])) and ranges[-1][1] == 1000
    assert plan_shards(np.ones(3), 8, 100) == [(0, 1), (1, 2), (2, 3)]


def test_shards_carry_every_column_with_rows_and_uids(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(23))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 4})
    rundir = prepare_run(config)
    manifest = rundir.manifest()
    assert manifest["num_rows"] == 23 and len(manifest["shards"]) == 4
    tables = [pq.read_table(rundir.shard_input(s)) for s in range(4)]
    joined = pa.concat_tables(tables)
    assert joined.column(ROW).to_pylist() == list(range(23))
    assert joined.drop_columns([ROW, UID]).equals(pq.read_table(inp))
    assert len(set(joined.column(UID).to_pylist())) == 23
    # the same input gives the same uids in another run directory
    other = prepare_run(make_config(tmp_path / "b", tiny_model, inp, sharding={"num_shards": 2}))
    again = pa.concat_tables([pq.read_table(other.shard_input(s)) for s in range(2)])
    assert again.column(UID).equals(joined.column(UID))


def test_id_column_gives_uids(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(5))
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp, data={"id_column": "qid"}))
    assert pq.read_table(rundir.shard_input(0)).column(UID).to_pylist() == [f"q{i:04d}" for i in range(5)]


def test_reopen_refuses_changed_generation_settings(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(5))
    run_task(prepare_run(make_config(tmp_path, tiny_model, inp)).root, 0)  # samples committed: settings are fixed
    with pytest.raises(HpcRolloutError, match=r"sampling settings[\s\S]*sampling.temperature: 1.0 -> 0.5"):
        prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"temperature": 0.5}))
    write_input(inp, make_prompts(6))
    with pytest.raises(HpcRolloutError, match="input file"):
        prepare_run(make_config(tmp_path, tiny_model, inp))
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"temperature": 0.5}), force=True)
    assert rundir.load_config().sampling.temperature == 0.5
    assert rundir.manifest()["forced"]
    # resources may change freely
    prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"temperature": 0.5}, executor={"num_tasks": 3}), force=True)
    assert RunDir(tmp_path / "run").manifest()["num_tasks"] == 3


def test_any_setting_may_change_while_nothing_is_committed(tmp_path, tiny_model):
    """Every task failed before committing a sample (a wrong model path): resume with any change, no --force."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(5))
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp))
    rundir.write_heartbeat(0, state="running", prompts_done=0)  # an attempt that started, then died
    changed = make_config(tmp_path, tiny_model, write_input(tmp_path / "in.parquet", make_prompts(6)), sampling={"temperature": 0.5})
    with pytest.raises(HpcRolloutError, match="sampling settings"):  # not while a task of the run is queued or running
        prepare_run(changed, busy=True)
    rundir = prepare_run(changed)
    assert rundir.load_config().sampling.temperature == 0.5 and "forced" not in rundir.manifest()
    assert rundir.manifest()["num_rows"] == 6 and pq.read_table(rundir.shard_input(0)).num_rows == 6  # sharded again
    assert not rundir.heartbeat(0).exists()
    # once a sample is committed, the settings are those of the samples
    run_task(rundir.root, 0)
    with pytest.raises(HpcRolloutError, match="sampling settings"):
        prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"temperature": 0.7}))


@pytest.mark.slow
def test_hundred_thousand_rows_stream(tmp_path, tiny_model):
    """10^5 rows in small row groups: sharding streams them (row order, balance, no whole-file read)."""
    n = 100_000
    prompts = pa.array([[{"role": "user", "content": "q" * (i % 50 + 1)}] for i in range(n)])
    inp = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": prompts, "i": pa.array(range(n))}), inp, row_group_size=5000)
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 16, "max_prompts_per_shard": 10_000}))
    shards = rundir.manifest()["shards"]
    assert len(shards) == 16 and sum(s["prompts"] for s in shards) == n
    last = pq.read_table(rundir.shard_input(15), columns=["i", ROW])
    assert last.column("i").to_pylist() == last.column(ROW).to_pylist()


def test_dynamic_mode_plans_shrinking_units():
    from hpcrollout.claims import tapered_unit_sizes

    work = np.ones(10_000)
    ranges = plan_shards(work, 0, 10_000, tapered_unit_sizes(4))
    sizes = [b - a for a, b in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == 10_000 and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    assert 40 <= len(ranges) <= 80 and sizes[0] > 10 * sizes[-1]
    assert all(a >= b - 1 for a, b in zip(sizes, sizes[1:]))  # non-increasing (up to rounding)


def test_reopen_refuses_a_sharding_mode_change_without_force(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(5))
    prepare_run(make_config(tmp_path, tiny_model, inp))
    with pytest.raises(HpcRolloutError, match=r"sharding.mode \(static -> dynamic"):  # tasks of the run are queued
        prepare_run(make_config(tmp_path, tiny_model, inp, sharding={"mode": "dynamic"}), busy=True)
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp, sharding={"mode": "dynamic"}), force=True)
    assert rundir.manifest()["mode"] == "dynamic"


@pytest.mark.parametrize("form", ["directory", "glob"])
def test_input_as_several_files(tmp_path, tiny_model, form):
    """A directory or glob of Parquet files is one input, read in name order; merge restores that order."""
    from hpcrollout.merge import merge_run
    from hpcrollout.worker import run_task

    rows = make_prompts(9)
    (tmp_path / "in").mkdir()
    for name, chunk in (("part-0.parquet", rows[:4]), ("part-1.parquet", rows[4:7]), ("part-2.parquet", rows[7:])):
        write_input(tmp_path / "in" / name, chunk)
    spec = tmp_path / "in" if form == "directory" else tmp_path / "in" / "part-*.parquet"
    config = make_config(tmp_path, tiny_model, spec, sharding={"num_shards": 2}, sampling={"n": 1, "max_tokens": 2})
    rundir = prepare_run(config)
    assert rundir.manifest()["input"]["files"] == 3 and rundir.manifest()["num_rows"] == 9
    run_task(rundir.root, 0)
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").column("qid").to_pylist() == [r["qid"] for r in rows]
    # reopening with the same files is fine; a changed file is refused
    prepare_run(config)
    write_input(tmp_path / "in" / "part-2.parquet", rows[7:8])
    with pytest.raises(HpcRolloutError, match="input file"):
        prepare_run(config)
