"""status from the run directory alone (no scheduler involved): pending, running, failed with log tail, done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from hpcrollout.rundir import RunDir, write_json_atomic
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input


def _prepared(tmp_path, model, shards: int = 3):
    inp = write_input(tmp_path / "in.parquet", make_prompts(9))
    config = make_config(
        tmp_path, model, inp, sharding={"num_shards": shards}, executor={"type": "local", "num_tasks": shards}
    )
    return prepare_run(config)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_of_a_prepared_run_is_all_pending(tiny_model, tmp_path):
    rundir = _prepared(tmp_path, tiny_model)
    st = run_status(rundir.root)
    assert st["counts"] == {"pending": 3} and not st["complete"] and st["failed"] == []
    assert st["prompts"] == {"done": 0, "total": 9} and st["samples"] == {"done": 0, "total": 27}
    proc = subprocess.run(
        [sys.executable, "-m", "hpcrollout.status", str(rundir.root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"pending": 3}


def test_status_running_failed_and_done_from_the_run_directory(tiny_model, tmp_path):
    rundir = _prepared(tmp_path, tiny_model)
    run_task(rundir.root, 0)  # shard 0 done
    now = time.time()
    # shard 1: a live worker (this process) halfway through; shard 2: a worker that died, with its log
    common = {"state": "running", "prompts_total": 3, "started": now - 10, "output_tokens_this_attempt": 40}
    rundir.write_heartbeat(1, prompts_done=2, prompts_done_this_attempt=2, tokens_per_s=4.0, eta_s=5.0, **common)
    write_json_atomic(
        rundir.heartbeat(2),
        {
            "shard": 2,
            "prompts_done": 1,
            "prompts_done_this_attempt": 1,
            "tokens_per_s": 1.0,
            "host": os.uname().nodename,
            "pid": _dead_pid(),
            "time": now,
            **common,
        },
    )
    write_json_atomic(
        rundir.root / "jobs.json", {"submissions": [{"executor": "local", "tasks": [0, 1, 2], "time": now}]}
    )
    rundir.logs_dir.mkdir(parents=True, exist_ok=True)
    (rundir.logs_dir / "local-task-2.log").write_text(
        "starting\nTraceback (most recent call last):\nMemoryError: out of memory\n"
    )

    st = run_status(rundir.root)
    states = {e["shard"]: e["state"] for e in st["shards"]}
    assert states == {0: "done", 1: "running", 2: "failed"}
    assert st["prompts"] == {"done": 3 + 2 + 1, "total": 9}
    assert st["tokens_per_s"] == 4.0 and st["eta_s"] is not None and st["slowest"] == [1]
    (failed,) = st["failed"]
    assert failed["task"] == 2 and "MemoryError: out of memory" in failed["log_tail"]
    text = format_status(st)
    assert "FAILED task 2" in text and "MemoryError: out of memory" in text
    assert f"hpcrollout resume {RunDir(rundir.root).root}" in text


def test_local_submit_failed_task_is_reported_with_its_log(tiny_model, tmp_path):
    """executor.type local through submit: a task that dies before its first heartbeat is still reported failed."""
    from hpcrollout.submit import submit_run

    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    config = make_config(
        tmp_path, tiny_model, inp, sharding={"num_shards": 2}, executor={"num_tasks": 2, "local_parallelism": 2}
    )
    rundir = prepare_run(config)
    rundir.shard_input(1).write_bytes(b"this is not a parquet file")
    result = submit_run(config)
    assert result["exit_codes"][0] == 0 and result["exit_codes"][1] != 0
    st = run_status(rundir.root)
    assert {e["shard"]: e["state"] for e in st["shards"]} == {0: "done", 1: "failed"}
    assert "Parquet magic bytes not found" in st["failed"][0]["log_tail"]


def test_a_deliberate_scancel_reads_as_cancelled_not_failed():
    """sacct says CANCELLED, exit 0:0: the report says CANCELLED, without a meaningless exit code."""
    from hpcrollout.status import format_status as fmt

    st = {
        "run_dir": "/r", "prompts": {"done": 0, "total": 4}, "samples": {"done": 0, "total": 4}, "counts": {"failed": 1},
        "shards": [], "num_tasks": 1, "mode": "static", "output_tokens": 0, "tokens_per_s": 0.0, "eta_s": None,
        "complete": False, "scheduler": {"squeue": True, "sacct": True}, "tasks": [], "slowest": [],
        "resume_command": "hpcrollout resume /r", "claims": None,
        "failed": [{"task": 0, "job_id": "66_0", "shards": [0], "slurm_state": "CANCELLED", "exit_code": "0:0",
                    "failures": 0, "error": None, "log": None, "log_tail": ""}],
    }
    text = fmt(st)
    assert "CANCELLED task 0 (job 66_0, CANCELLED): shards 0" in text and "FAILED" not in text and "0:0" not in text
    st["failed"][0].update(slurm_state="FAILED", exit_code="1:0")
    assert "FAILED task 0 (job 66_0, FAILED, exit 1:0)" in fmt(st)
