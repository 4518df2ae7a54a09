"""Interrupt real SLURM tasks (scancel, the pre-timeout signal, a task that raises), then resume: nothing lost or doubled."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess

import pyarrow.parquet as pq
import pytest

from hpcrollout import resume, status
from hpcrollout.executors.jobs import latest_jobs
from hpcrollout.executors.slurm_task import read_task_record
from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.shard import prepare_run
from hpcrollout.status import run_status
from hpcrollout.submit import submit_run
from hpcrollout.worker import committed_parts, read_rows, run_task
from tests.conftest import make_prompts, write_input
from tests.slurm_fixtures import freeze_when, sample_keys, wait_for_jobs, wait_signal_pending, wait_until
from tests.test_slurm_array import slurm_config

pytestmark = pytest.mark.slurm

N_PROMPTS = 48  # one shard, committed one prompt at a time


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The uninterrupted run (same config and seeds, in this process): what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("slurm-reference")
    inp = write_input(tmp / "in.parquet", make_prompts(N_PROMPTS))
    config = slurm_config(tmp, tiny_model, inp, "reference", checkpoint={"every_prompts": 1})
    prepare_run(config)
    run_task(config.run_dir, 0)
    merge_run(config.run_dir, tmp / "merged.parquet")
    return inp, pq.read_table(tmp / "merged.parquet")


def _parts(rundir: RunDir, shard: int = 0) -> int:
    d = rundir.parts_dir(shard)
    return len(list(d.glob("part-*.parquet"))) if d.is_dir() else 0


def _assert_merged_equals(rundir: RunDir, out, expected) -> None:
    merge_run(rundir.root, out)
    merged = pq.read_table(out)
    keys = sample_keys(merged)
    assert len(keys) == len(set(keys)) == expected.num_rows * 3
    assert merged.equals(expected), "resumed output differs from the uninterrupted run"


def _resume(run_dir, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    resume.add_cli_args(parser)
    return resume.main(parser.parse_args([str(run_dir), *extra]))


def test_scancel_midway_then_resume(slurm_cluster, tiny_model, tmp_path, reference, capsys):
    inp, expected = reference
    config = slurm_config(tmp_path, tiny_model, inp, "scancel", checkpoint={"every_prompts": 1})
    first = submit_run(config)
    rundir = RunDir(config.run_dir)
    (job,) = latest_jobs(rundir).values()
    freeze_when(lambda: read_task_record(rundir, 0).get("pid"), lambda: _parts(rundir) >= 2, "2 committed parts")
    subprocess.run(["scancel", job], check=True)  # SLURM sends SIGCONT, SIGTERM, and SIGKILL after KillWait
    assert wait_for_jobs([first["job_id"]]) == {job: ["CANCELLED"]}
    committed = len(set(read_rows(committed_parts(rundir, 0))))
    assert 2 <= committed < N_PROMPTS and not rundir.is_done(0)
    wait_until(lambda: run_status(rundir.root)["counts"].get("failed") == 1, what="status to show the cancelled task")

    assert _resume(rundir.root) == 0
    assert "submitted array job" in capsys.readouterr().out
    (job2,) = latest_jobs(rundir).values()
    assert job2 != job
    assert wait_for_jobs([job2]) == {job2: ["COMPLETED"]}
    marker = read_json(rundir.done_marker(0))
    assert marker["prompts_this_attempt"] <= N_PROMPTS - committed  # committed prompts were not generated again
    _assert_merged_equals(rundir, tmp_path / "merged.parquet", expected)


def test_pre_timeout_signal_requeues_and_finishes(slurm_cluster, tiny_model, tmp_path, reference):
    """USR2 is what SLURM sends signal_delay_s before the time limit: checkpoint, requeue, continue."""
    inp, expected = reference
    config = slurm_config(tmp_path, tiny_model, inp, "requeue", checkpoint={"every_prompts": 1})
    result = submit_run(config)
    rundir = RunDir(config.run_dir)
    (job,) = latest_jobs(rundir).values()
    pid = freeze_when(lambda: read_task_record(rundir, 0).get("pid"), lambda: _parts(rundir) >= 2, "2 committed parts")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_signal_pending(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: read_task_record(rundir, 0).get("requeues") == 1, what="the checkpoint to record a requeue")
    # waits for sacct to record the final state too (slurmdbd lags squeue): once, a single read saw RUNNING
    history = wait_for_jobs([result["job_id"]])

    assert rundir.is_done(0)
    record = read_task_record(rundir, 0)
    assert record["state"] == "done" and record["attempts"] == 2 and record["requeues"] == 1
    assert history[job] == ["REQUEUED", "COMPLETED"], history
    marker = read_json(rundir.done_marker(0))
    assert marker["prompts_this_attempt"] < N_PROMPTS  # the requeued attempt continued, it did not start over
    st = run_status(rundir.root)
    assert st["complete"] and st["shards"][0]["requeues"] == 1
    _assert_merged_equals(rundir, tmp_path / "merged.parquet", expected)


def test_failing_task_is_reported_and_resume_reruns_only_it(slurm_cluster, tiny_model, tmp_path, capsys):
    inp = write_input(tmp_path / "in.parquet", make_prompts(12))
    config = slurm_config(
        tmp_path,
        tiny_model,
        inp,
        "fail",
        sharding={"num_shards": 2},
        executor={"num_tasks": 2},
        slurm={"max_retries": 1},
    )
    rundir = prepare_run(config)
    good = rundir.shard_input(1).read_bytes()
    rundir.shard_input(1).write_bytes(b"this is not a parquet file")  # task 1 raises on every attempt
    first = submit_run(config)
    history = wait_for_jobs([first["job_id"]])
    assert history[f"{first['job_id']}_0"] == ["COMPLETED"] and history[f"{first['job_id']}_1"][-1] == "FAILED", history

    assert rundir.done_shards() == {0}
    record = read_task_record(rundir, 1)
    assert record["state"] == "failed" and record["failures"] == 2  # the first attempt and one retry
    st = run_status(rundir.root)
    assert st["counts"] == {"done": 1, "failed": 1}
    (failed,) = st["failed"]
    assert failed["task"] == 1 and failed["shards"] == [1]
    assert (st["shards"][1]["retries"], st["shards"][1]["requeues"]) == (1, 0)  # a retry, not a timeout requeue
    assert "Parquet magic bytes not found" in failed["log_tail"]
    text = status.format_status(st)
    assert "FAILED task 1" in text and "Parquet magic bytes" in text and f"hpcrollout resume {rundir.root}" in text

    rundir.shard_input(1).write_bytes(good)
    assert _resume(rundir.root) == 0
    jobs = read_json(rundir.root / "jobs.json")["submissions"]
    assert jobs[-1]["tasks"] == [1]  # only the failed task is resubmitted
    assert all(states == ["COMPLETED"] for states in wait_for_jobs([jobs[-1]["job_id"]]).values())
    assert rundir.done_shards() == {0, 1}
    assert read_task_record(rundir, 1)["state"] == "done"
    merge_run(rundir.root, tmp_path / "merged.parquet")
    merged = pq.read_table(tmp_path / "merged.parquet")
    keys = sample_keys(merged)
    assert len(keys) == len(set(keys)) == 12 * 3
