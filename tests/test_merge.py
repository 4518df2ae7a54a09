from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.errors import HpcRolloutError
from hpcrollout.merge import iter_merged_batches, merge_run
from hpcrollout.shard import prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input


@pytest.fixture()
def finished(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(10))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 3}, sampling={"logprobs": True, "return_token_ids": True})
    rundir = prepare_run(config)
    run_task(rundir.root, 0)
    return inp, rundir


def test_merge_keeps_input_columns_in_order(tmp_path, finished):
    inp, rundir = finished
    stats = merge_run(rundir.root, tmp_path / "m.parquet")
    merged = pq.read_table(tmp_path / "m.parquet")
    source = pq.read_table(inp)
    assert stats["rows"] == 10 and stats["responses"] == 30
    assert merged.select(source.column_names).equals(source)
    for col in ("uid", "responses", "response_tokens", "finish_reasons", "sample_seeds", "prompt_tokens", "error",
                "token_ids", "logprobs", "cumulative_logprobs"):
        assert col in merged.column_names
    row = merged.slice(0, 1).to_pylist()[0]
    assert len(row["responses"]) == 3 and row["sample_seeds"][1] == row["sample_seeds"][0] + 1
    assert [len(t) for t in row["token_ids"]] == row["response_tokens"] == [len(lp) for lp in row["logprobs"]]
    assert set(row["finish_reasons"]) <= {"stop", "length"}


def test_merge_refuses_missing_shards_and_names_them(tmp_path, finished):
    _, rundir = finished
    rundir.done_marker(1).unlink()
    with pytest.raises(HpcRolloutError, match=r"1 of 3 shards are not finished \(00001\).*hpcrollout resume"):
        merge_run(rundir.root, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()
    stats = merge_run(rundir.root, tmp_path / "partial.parquet", partial=True)
    assert 0 < stats["rows"] < 10


def test_merge_refuses_doubled_rows(tmp_path, finished):
    _, rundir = finished
    out = rundir.shard_output(2)
    table = pq.read_table(out)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), out)
    with pytest.raises(HpcRolloutError, match="shard 00002: output has"):
        merge_run(rundir.root, tmp_path / "m.parquet")


def test_iter_merged_batches_streams(finished):
    _, rundir = finished
    schema, batches = iter_merged_batches(rundir.root, batch_rows=4)
    sizes = [b.num_rows for b in batches]
    assert sum(sizes) == 10 and max(sizes) <= 4 and "responses" in schema.names


def test_merge_of_a_run_still_running_says_wait_not_resume(tmp_path, tiny_model):
    """resume would submit nothing for a shard being generated: merge says to wait for it."""
    import time

    from hpcrollout.rundir import write_json_atomic

    inp = write_input(tmp_path / "in.parquet", make_prompts(4))
    rundir = prepare_run(make_config(tmp_path, tiny_model, inp))
    write_json_atomic(rundir.root / "jobs.json", {"submissions": [{"executor": "local", "tasks": [0], "time": time.time()}]})
    rundir.write_heartbeat(0, state="running", prompts_total=4, prompts_done=1, started=time.time())  # this live pid
    with pytest.raises(HpcRolloutError, match=r"1 of them still running or queued; wait for them .*--watch") as err:
        merge_run(rundir.root, tmp_path / "m.parquet")
    assert "hpcrollout resume" not in str(err.value)
