"""Attacks on the run directory (issue 11): data mixed or overwritten, runs stuck or run twice, and the damaged
files, full disks and odd inputs that used to end in a traceback. A real tiny model and real files throughout;
the disk-full and read-only cases mount a real tmpfs (root only, as the SLURM test cluster needs too)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout import cli
from hpcrollout.errors import HpcRolloutError
from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input

N = 6
FAST = {"sampling": {"n": 2, "max_tokens": 4, "temperature": 1.0, "seed": 7}}


def _config(tmp_path: Path, model: Path, inp: Path, **sections):
    return make_config(tmp_path, model, inp, **{**FAST, "sharding": {"num_shards": 2}, **sections})


@pytest.fixture(autouse=True)
def _cli_logging():
    """cli.main attaches a handler to the current (captured) stderr; take it off again after each test."""
    logger = logging.getLogger("hpcrollout")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished 2-shard run and its merged table; tests work on copies (copy_run)."""
    tmp = tmp_path_factory.mktemp("finished")
    inp = write_input(tmp / "in.parquet", make_prompts(N))
    config = _config(tmp, tiny_model, inp)
    prepare_run(config)
    run_task(config.run_dir, 0)
    merge_run(config.run_dir, tmp / "merged.parquet")
    return config, pq.read_table(tmp / "merged.parquet")


def copy_run(finished, tmp_path: Path) -> RunDir:
    config, _ = finished
    shutil.copytree(config.run_dir, tmp_path / "run")
    return RunDir(tmp_path / "run")


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must fail with a one-line 'error:' and no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: " in err and "Traceback" not in err, err
    return err


def wait_for(what: str, check, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def keys_once(table: pa.Table, prompts: int, n: int) -> None:
    keys = [(u, s) for u, seeds in zip(table["uid"].to_pylist(), table["sample_seeds"].to_pylist()) for s in seeds]
    assert table.num_rows == prompts and len(keys) == len(set(keys)) == prompts * n


# ------------------------------------------------------------------------------------------ 1. internal columns
@pytest.mark.parametrize(
    "values",
    [
        [1000, 1007, 1014, 1021, 1028, 1035],
        ["r-a", "r-b", "r-c", "r-d", "r-e", "r-f"],
        [{"page": i, "line": 2 * i} for i in range(6)],
    ],
    ids=["int", "string", "struct"],
)
def test_input_column_named_row_comes_back_unchanged(tiny_model, tmp_path, capsys, values):
    rows = make_prompts(N)
    for r, v in zip(rows, values):
        r["row"] = v
    inp = write_input(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    argv = ["run", "--backend", "transformers", "--model_path", str(tiny_model), "--input", str(inp),
            "--output", str(out), "--n_samples", "2", "--max_tokens", "4"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    merged = pq.read_table(out)
    assert (
        merged["row"].to_pylist() == values and merged.schema.field("row").type == pq.read_schema(inp).field("row").type
    )
    assert merged.select(pq.read_schema(inp).names).equals(pq.read_table(inp))
    assert cli.main(["flatten", str(out), "--output", str(tmp_path / "flat.parquet")]) == 0
    flat = pq.read_table(tmp_path / "flat.parquet")
    assert flat["row"].to_pylist() == [v for v in values for _ in range(2)]


def test_input_column_with_the_internal_prefix_is_refused_before_the_run(tiny_model, tmp_path):
    rows = [{**r, "_hpcr_row": i} for i, r in enumerate(make_prompts(N))]
    inp = write_input(tmp_path / "in.parquet", rows)
    with pytest.raises(HpcRolloutError, match=r"has column\(s\) _hpcr_row, named like hpcrollout's internal"):
        prepare_run(_config(tmp_path, tiny_model, inp))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ 2. engine settings
def _partial(finished, tmp_path: Path) -> RunDir:
    rundir = copy_run(finished, tmp_path)
    rundir.shard_output(1).unlink()
    rundir.done_marker(1).unlink()
    return rundir


@pytest.mark.parametrize(
    "setting, shown",
    [
        ("engine.dtype=bfloat16", "engine.dtype: 'auto' -> 'bfloat16'"),
        ("engine.max_model_len=40", "engine.max_model_len: None -> 40"),
        ("engine.kv_cache_dtype=fp8", "engine.kv_cache_dtype: 'auto' -> 'fp8'"),
        ("engine.kwargs={revision: v2}", "engine.kwargs.revision: None -> 'v2'"),
    ],
)
def test_resume_refuses_engine_settings_that_change_samples(finished, tmp_path, capsys, setting, shown):
    rundir = _partial(finished, tmp_path)
    err = cli_error(["resume", str(rundir.root), "--set", setting, "--dry-run"], capsys)
    assert "changed: engine settings" in err and shown in err and "--force" in err


def test_resume_accepts_changed_engine_resources(finished, tmp_path, capsys):
    rundir = _partial(finished, tmp_path)
    sets = ["engine.gpu_memory_utilization=0.5", "engine.max_num_seqs=8", "engine.tensor_parallel_size=2",
            "engine.kv_budget=0.5", "engine.kwargs={swap_space: 2, enforce_eager: true}"]  # fmt: skip
    argv = ["resume", str(rundir.root), "--dry-run"] + [x for s in sets for x in ("--set", s)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "would submit: 1 task(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ 3. model directory
def test_weights_rebuilt_at_the_same_model_path_are_refused(tiny_model, tmp_path, capsys):
    from hpcrollout.tinymodel import build_tiny_model

    snapshots = tmp_path / "models"
    shutil.copytree(tiny_model, snapshots / "v1")
    (snapshots / "latest").symlink_to(snapshots / "v1")
    inp = write_input(tmp_path / "in.parquet", make_prompts(N))
    config = _config(tmp_path, snapshots / "latest", inp)
    rundir = prepare_run(config)
    run_task(rundir.root, 0, shards=[0])
    (tmp_path / "run.yaml").write_text(config.to_yaml())

    # `latest` now points at another snapshot: the same model.path, other weights
    shutil.copytree(tiny_model, snapshots / "v2")
    (snapshots / "latest").unlink()
    (snapshots / "latest").symlink_to(snapshots / "v2")
    err = cli_error(["submit", "--config", str(tmp_path / "run.yaml"), "--dry-run"], capsys)
    assert f"now resolves to {snapshots / 'v2'}" in err and "--force" in err

    # the directory itself rebuilt with another seed
    (snapshots / "latest").unlink()
    (snapshots / "latest").symlink_to(snapshots / "v1")
    shutil.rmtree(snapshots / "v1")
    build_tiny_model(snapshots / "v1", seed=1)
    err = cli_error(["submit", "--config", str(tmp_path / "run.yaml"), "--dry-run"], capsys)
    assert f"model directory ({snapshots / 'v1'}: " in err and "changed since the run started" in err


# ------------------------------------------------------------------------------------------ 4. NaN and repeated ids
def test_nan_ids_are_refused_like_nulls(tiny_model, tmp_path):
    table = pa.table({"prompt": [f"say {i}" for i in range(4)], "id": pa.array([2.0, math.nan, math.nan, 3.0])})
    inp = write_input(tmp_path / "in.parquet", table)
    with pytest.raises(HpcRolloutError, match=r"in.parquet row 1: id column 'id' is NaN"):
        prepare_run(_config(tmp_path, tiny_model, inp, data={"id_column": "id"}))


def test_merge_refuses_a_repeated_uid(finished, tmp_path):
    """Two prompts with one uid (they would share seeds) are refused by merge itself, naming the uid and rows."""
    rundir = copy_run(finished, tmp_path)
    first_uid = pq.read_table(rundir.shard_output(0))["uid"][0].as_py()
    for path, col in ((rundir.shard_input(1), "_hpcr_uid"), (rundir.shard_output(1), "uid")):
        t = pq.read_table(path)
        uids = t[col].to_pylist()
        uids[0] = first_uid
        pq.write_table(t.set_column(t.schema.get_field_index(col), col, pa.array(uids, pa.string())), path)
    start = rundir.manifest()["shards"][1]["rows"][0]
    with pytest.raises(HpcRolloutError, match=rf"uid '{first_uid}' is at rows 0 and {start}"):
        merge_run(rundir.root, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


# ------------------------------------------------------------------------------------------ 5. deleted output
def test_a_deleted_output_with_its_marker_left_is_redone(finished, tmp_path, capsys):
    from hpcrollout.submit import submit_run

    config, reference = finished
    rundir = copy_run(finished, tmp_path)
    rundir.shard_output(1).unlink()  # the marker stays
    st = run_status(rundir.root)
    assert not st["complete"] and st["counts"].get("done") == 1
    assert any("marked done but its output" in n for n in st["notes"])
    with pytest.raises(HpcRolloutError, match=r"1 of 2 shards are not finished \(00001\)"):
        merge_run(rundir.root, tmp_path / "m.parquet")
    result = submit_run(rundir.load_config().model_copy(update={"run_dir": str(rundir.root)}), command="resume")
    assert result["tasks"] == [0] and result["exit_codes"] == {0: 0}
    assert run_status(rundir.root)["complete"]
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").equals(reference)


# ------------------------------------------------------------------------------------------ 6. local executor
def _task_pid(rundir: RunDir, task: int) -> int | None:
    from hpcrollout.executors.local import local_task_record

    rec = local_task_record(rundir, task)
    return rec.get("pid") if rec.get("state") == "running" else None


def test_live_local_tasks_count_as_running_even_after_their_submit_is_killed(tiny_model, tmp_path):
    from hpcrollout.executors.local import local_active_tasks
    from hpcrollout.submit import submit_run

    inp = write_input(tmp_path / "in.parquet", make_prompts(N))
    config = _config(tmp_path, tiny_model, inp, executor={"num_tasks": 2, "local_parallelism": 1})
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    rundir = RunDir(config.run_dir)
    submit = subprocess.Popen([sys.executable, "-m", "hpcrollout.submit", "--config", str(tmp_path / "run.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    worker = 0
    try:
        worker = wait_for("task 0's worker", lambda: _task_pid(rundir, 0))
        os.kill(worker, signal.SIGSTOP)  # hold task 0 running while we look (no timing involved)
        assert set(local_active_tasks(rundir)) == {0, 1}  # 0 running, 1 queued in its submit

        second = submit_run(config)  # a second submit while the first's tasks live
        assert second["tasks"] == [] and set(second["active"]) == {0, 1}

        submit.kill()  # SIGKILL: the worker (own session) lives on; the queued task 1 never starts
        submit.wait()
        assert set(local_active_tasks(rundir)) == {0}
        states = {e["shard"]: e["state"] for e in run_status(rundir.root)["shards"]}
        assert states[1] == "failed"  # its submit died before starting it: not "pending"
        assert states[0] in ("pending", "running")

        resumed = submit_run(config, command="resume")
        assert resumed["tasks"] == [1] and set(resumed["active"]) == {0} and resumed["exit_codes"] == {1: 0}
    finally:
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)
        if submit.poll() is None:
            submit.kill()
    wait_for("task 0 to finish", lambda: not local_active_tasks(rundir))
    assert rundir.done_shards() == {0, 1}
    log0 = (rundir.logs_dir / "local-task-0.log").read_text()
    assert log0.count("task 0: shards [0]") == 1  # task 0 ran once
    merge_run(rundir.root, tmp_path / "m.parquet")
    keys_once(pq.read_table(tmp_path / "m.parquet"), N, 2)


# ------------------------------------------------------------------------------------------ 7. dead claim holder
def test_dynamic_resume_takes_over_a_unit_whose_holder_died(tiny_model, tmp_path):
    from hpcrollout.submit import submit_run

    inp = write_input(tmp_path / "in.parquet", make_prompts(N))
    config = _config(tmp_path, tiny_model, inp, sharding={"mode": "dynamic", "num_shards": 1, "lease_seconds": 600},
                     checkpoint={"every_prompts": 1})  # fmt: skip
    rundir = prepare_run(config)
    dead = subprocess.run([sys.executable, "-m", "hpcrollout.worker", str(rundir.root), "--task", "0"],
                          env={**os.environ, "HPCROLLOUT_CRASH_AT": "after_part:2"}, capture_output=True, timeout=300)  # fmt: skip
    assert dead.returncode == 137
    assert run_status(rundir.root)["shards"][0]["claim"]["state"] == "dead"
    result = submit_run(config, command="resume")  # right away: the 600 s lease is nowhere near its end
    assert result["exit_codes"] == {0: 0}
    assert rundir.done_shards() == {0}
    merge_run(rundir.root, tmp_path / "m.parquet")
    keys_once(pq.read_table(tmp_path / "m.parquet"), N, 2)


# ------------------------------------------------------------------------------------------ 8, 9. merge's output
def test_a_refused_merge_leaves_no_file(finished, tmp_path):
    rundir = copy_run(finished, tmp_path)
    out = tmp_path / "m.parquet"
    # the last shard shortened consistently (input and output): merge only learns at the end
    for path in (rundir.shard_input(1), rundir.shard_output(1)):
        t = pq.read_table(path)
        pq.write_table(t.slice(0, t.num_rows - 1), path)
    with pytest.raises(HpcRolloutError, match=r"merged 5 rows but the input had 6; .*nothing was written"):
        merge_run(rundir.root, out)
    assert not out.exists()
    out.write_bytes(b"an older merge")
    with pytest.raises(HpcRolloutError, match="merged 5 rows"):
        merge_run(rundir.root, out)
    assert out.read_bytes() == b"an older merge"


def test_a_shard_missing_from_the_manifest_is_refused_before_merging(finished, tmp_path):
    rundir = copy_run(finished, tmp_path)
    manifest = json.loads(rundir.manifest_path.read_text())
    manifest["shards"] = manifest["shards"][:1]
    rundir.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(HpcRolloutError, match=r"not a run manifest \(the shards cover 3 rows, but num_rows is 6\)"):
        merge_run(rundir.root, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_merge_refuses_an_output_inside_the_run_directory(finished, tmp_path, capsys):
    rundir = copy_run(finished, tmp_path)
    before = rundir.manifest_path.read_bytes()
    err = cli_error(["merge", str(rundir.root), "--output", str(rundir.manifest_path)], capsys)
    assert "is inside the run directory" in err
    assert rundir.manifest_path.read_bytes() == before
    cli_error(["merge", str(rundir.root), "--output", str(rundir.root / "merged.parquet")], capsys)


# ------------------------------------------------------------------------------------------ 10. flatten
def _merged_file(tmp_path: Path, **columns) -> Path:
    base = {
        "uid": ["a", "b"],
        "responses": [["x", "y"], ["z"]],
        "response_tokens": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
        "finish_reasons": [["stop", "length"], ["stop"]],
        "error": pa.array([None, None], pa.string()),
    }
    base.update(columns)
    path = tmp_path / "merged.parquet"
    pq.write_table(pa.table(base), path)
    return path


def test_flatten_refuses_misaligned_per_sample_lists(tmp_path, capsys):
    path = _merged_file(tmp_path, response_tokens=pa.array([[1, 2], []], pa.list_(pa.int32())))
    err = cli_error(["flatten", str(path), "--output", str(tmp_path / "flat.parquet")], capsys)
    assert "row 1 has 1 responses but 0 response_tokens" in err
    assert not (tmp_path / "flat.parquet").exists()


# ------------------------------------------------------------------------------------------ damaged part files
def _parts_from_output(rundir: RunDir, shard: int, rows: slice) -> pa.Table:
    """Turn a finished shard back into an unfinished one whose committed part holds some of its rows."""
    out = pq.read_table(rundir.shard_output(shard))
    rundir.shard_output(shard).unlink()
    rundir.done_marker(shard).unlink()
    rundir.parts_dir(shard).mkdir(parents=True)
    pq.write_table(out.slice(rows.start, rows.stop - rows.start), rundir.parts_dir(shard) / "part-1-a-00001.parquet")
    return out


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "foreign"])
def test_a_damaged_part_is_quarantined_and_its_prompts_generated_again(finished, tmp_path, caplog, damage):
    _, reference = finished
    rundir = copy_run(finished, tmp_path)
    out = _parts_from_output(rundir, 0, slice(0, 1))
    bad = rundir.parts_dir(0) / "part-2-b-00001.parquet"
    if damage == "truncated":
        pq.write_table(out.slice(1, 2), bad)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "zero-byte":
        bad.write_bytes(b"")
    else:  # the other shard's rows
        pq.write_table(pq.read_table(rundir.shard_output(1)), bad)
    summary = run_task(rundir.root, 0)
    assert [r["state"] for r in summary["results"]] == ["done"]
    assert rundir.quarantined() == [rundir.quarantine_dir / "parts" / "00000" / bad.name]
    assert f"part {bad}" in caplog.text and "its prompts are generated again" in caplog.text
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").equals(reference)
    assert any("set aside" in n for n in run_status(rundir.root)["notes"])


def test_a_second_finisher_of_a_unit_keeps_the_first_ones_output(finished, tmp_path, monkeypatch, caplog):
    """Two tasks finish one unit (a starved holder's claim was taken over): the winner's clean-up removes the
    parts the other is reading. The other keeps the winner's output instead of failing on "parts cover"."""
    from hpcrollout import worker
    from hpcrollout.schema import run_result_schema

    _, reference = finished
    rundir = copy_run(finished, tmp_path)
    output = rundir.shard_output(1)
    full = _parts_from_output(rundir, 1, slice(0, N))  # all its rows in one part, no output, no marker
    real_usable_parts = worker.usable_parts

    def the_other_finisher_wins_meanwhile(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pq.write_table(full, output)  # its output, then its clean-up of the parts
        for part in worker.committed_parts(rundir, 1):
            part.unlink()
        return real_usable_parts(*args, **kwargs)

    monkeypatch.setattr(worker, "usable_parts", the_other_finisher_wins_meanwhile)
    with caplog.at_level(logging.WARNING):
        done = worker.finish_shard(rundir, 1, run_result_schema(rundir.load_config()), {"attempt": 1})
    assert done["state"] == "done" and done["prompts"] == full.num_rows
    assert "finished by another task while its parts were read; keeping its output" in caplog.text
    assert rundir.done_marker(1).is_file()
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").equals(reference)


# ------------------------------------------------------------------------------------------ disk full, read-only
@pytest.fixture()
def tmpfs(tmp_path):
    """A real 2 MiB tmpfs (needs root, like the SLURM test cluster)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    """Fill the filesystem to the last byte."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_disk_full_names_the_path_and_resume_goes_on(tiny_model, tmp_path, tmpfs, capsys):
    inp = write_input(tmp_path / "in.parquet", make_prompts(N))
    config = _config(tmp_path, tiny_model, inp, run_dir=str(tmpfs / "run"))
    filler = _fill(tmpfs)
    with pytest.raises(HpcRolloutError, match=r"cannot write .*: the disk is full"):
        prepare_run(config)  # submit itself on a full disk
    filler.unlink()
    shutil.rmtree(tmpfs / "run")
    rundir = prepare_run(config)
    filler = _fill(tmpfs)
    err = cli_error(["worker", str(rundir.root), "--task", "0"], capsys)
    assert "the disk is full" in err and f"then run hpcrollout resume {rundir.root}" in err
    filler.unlink()
    run_task(rundir.root, 0)
    merge_run(rundir.root, tmp_path / "m.parquet")
    keys_once(pq.read_table(tmp_path / "m.parquet"), N, 2)


def test_read_only_run_directory_names_the_path(tiny_model, tmp_path, tmpfs, capsys):
    inp = write_input(tmp_path / "in.parquet", make_prompts(N))
    rundir = prepare_run(_config(tmp_path, tiny_model, inp, run_dir=str(tmpfs / "run")))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    err = cli_error(["resume", str(rundir.root)], capsys)
    assert f"cannot write {rundir.root / 'lock'}: the filesystem is read-only" in err


# ------------------------------------------------------------------------------------------ damaged run files
def test_a_deleted_shard_input_is_named_by_merge(finished, tmp_path, capsys):
    rundir = copy_run(finished, tmp_path)
    rundir.shard_input(1).unlink()
    err = cli_error(["merge", str(rundir.root), "--output", str(tmp_path / "m.parquet")], capsys)
    assert f"the shard input {rundir.shard_input(1)} is missing" in err and "Restore it" in err


@pytest.mark.parametrize("content", ["[]", '{"shards": 5, "num_rows": 6, "num_tasks": 1}', "{truncated"])
def test_a_damaged_manifest_is_named_and_not_to_be_deleted(finished, tmp_path, capsys, content):
    rundir = copy_run(finished, tmp_path)
    rundir.manifest_path.write_text(content)
    for argv in (["status", str(rundir.root)], ["resume", str(rundir.root)],
                 ["merge", str(rundir.root), "--output", str(tmp_path / "m.parquet")]):  # fmt: skip
        err = cli_error(argv, capsys)
        assert str(rundir.manifest_path) in err and "restore it from a backup, or start a new run_dir" in err
        assert "delete it to redo" not in err


def test_sharding_again_beside_old_results_is_refused(finished, tmp_path, capsys):
    rundir = copy_run(finished, tmp_path)
    rundir.manifest_path.unlink()
    config = rundir.load_config().model_copy(update={"run_dir": str(rundir.root)})
    with pytest.raises(HpcRolloutError, match=r"has results \(outputs/, done/\) but no manifest.json"):
        prepare_run(config)
    assert not rundir.manifest_path.exists()


def test_status_survives_malformed_heartbeats_and_jobs_json(finished, tmp_path, capsys):
    rundir = copy_run(finished, tmp_path)
    rundir.shard_output(1).unlink()
    rundir.done_marker(1).unlink()
    rundir.heartbeat(1).write_text('{"state": "running", "time": "yesterday", "pid": 1}')
    rundir.heartbeat(0).write_text("[1, 2]")
    (rundir.root / "jobs.json").write_text('{"submissions": 5}')
    st = run_status(rundir.root)
    assert [e["state"] for e in st["shards"]] == ["done", "pending"]
    text = format_status(st)
    assert f"note: {rundir.heartbeat(1)} does not hold a heartbeat record" in text
    assert f"{rundir.root / 'jobs.json'} is not a record of submissions" in text
    (rundir.root / "jobs.json").write_text("{not json")
    assert "jobs.json is unreadable or not valid JSON" in format_status(run_status(rundir.root))
    err = cli_error(["resume", str(rundir.root)], capsys)  # submit must not guess which tasks are queued
    assert "jobs.json is unreadable" in err and "move it aside" in err


# ------------------------------------------------------------------------------------------ post-processing
@pytest.mark.parametrize("command", ["analyze", "filter", "flatten"])
def test_a_responses_column_of_the_wrong_type_is_named(tmp_path, capsys, command):
    path = _merged_file(tmp_path, responses=pa.array([3, 4]))
    argv = [command, str(path)] + ([] if command == "analyze" else ["--output", str(tmp_path / "o.parquet")])
    err = cli_error(argv, capsys)
    assert "column 'responses' is int64, but a merged hpcrollout output has list<string>" in err


def test_merge_output_that_is_a_directory_is_refused(finished, tmp_path, capsys):
    rundir = copy_run(finished, tmp_path)
    (tmp_path / "outdir").mkdir()
    err = cli_error(["merge", str(rundir.root), "--output", str(tmp_path / "outdir")], capsys)
    assert "is a directory; give a file path" in err


def test_filter_names_the_finish_reasons_that_exist(tmp_path, capsys):
    path = _merged_file(tmp_path)
    err = cli_error(["filter", str(path), "--output", str(tmp_path / "o.parquet"), "--finish_reason", "bogus"], capsys)
    assert "--finish_reason bogus: not a finish reason" in err and "stop, length, abort" in err


def test_messages_stored_as_maps_are_messages(tiny_model, tmp_path):
    msgs = pa.array(
        [[[("role", "user"), ("content", f"hello {i}")]] for i in range(3)], pa.list_(pa.map_(pa.string(), pa.string()))
    )
    inp = write_input(tmp_path / "in.parquet", pa.table({"prompt": msgs}))
    config = _config(tmp_path, tiny_model, inp, sharding={"num_shards": 1})
    prepare_run(config)
    run_task(config.run_dir, 0)
    merge_run(config.run_dir, tmp_path / "m.parquet")
    merged = pq.read_table(tmp_path / "m.parquet")
    assert merged["error"].to_pylist() == [None] * 3
    assert [len(r) for r in merged["responses"].to_pylist()] == [2, 2, 2]
