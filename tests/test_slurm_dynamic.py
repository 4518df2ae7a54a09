"""Dynamic mode on the real SLURM test cluster: claims, tasks added to a running job, status of claims."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from hpcrollout import resume, status
from hpcrollout.claims import ClaimBoard
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.jobs import latest_jobs
from hpcrollout.executors.slurm_task import read_task_record
from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from hpcrollout.submit import dry_run, dynamic_task_ids, submit_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import sample_keys, wait_for_jobs, wait_until
from tests.test_slurm_array import slurm_config

N_PROMPTS = 32
N_SHARDS = 8


def _resume(run_dir, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    resume.add_cli_args(parser)
    return resume.main(parser.parse_args([str(run_dir), *extra]))


def _claims_of(rundir: RunDir, pid: int) -> list[dict]:
    """Claim files (any generation) written by this process."""
    out = []
    for path in rundir.claims_dir.glob("[0-9]*.g[0-9]*"):  # not the hidden temp files of a claim being written
        try:
            data = read_json(path)
        except (FileNotFoundError, HpcRolloutError):
            continue
        if data.get("pid") == pid:
            out.append(data)
    return out


def _snapshot(root) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_dynamic_task_ids_are_labels_topping_up_to_num_tasks():
    assert dynamic_task_ids(4, 100, {}) == [0, 1, 2, 3]
    assert dynamic_task_ids(8, 100, {0: "1_0", 1: "1_1", 2: "1_2", 3: "1_3"}) == [4, 5, 6, 7]
    assert dynamic_task_ids(4, 100, {0: "1_0", 2: "1_2"}) == [1, 3]  # a finished task's label is free again
    assert dynamic_task_ids(8, 5, {0: "1_0", 1: "1_1"}) == [2, 3, 4]  # never more tasks than unfinished shards
    assert dynamic_task_ids(2, 100, {0: "1_0", 1: "1_1", 2: "2"}) == []


def test_status_shows_claims_and_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """held, expired and released claims in status (JSON and text), with the run directory left untouched."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(12))
    config = make_config(tmp_path, tiny_model, inp, sharding={"mode": "dynamic", "num_shards": 4, "lease_seconds": 60})
    rundir = prepare_run(config)
    assert run_status(rundir.root)["claims"] == {"counts": {}, "unclaimed": 4}
    assert not rundir.claims_dir.exists()  # status did not create the claims directory
    live = ClaimBoard(rundir, owner="nodeA:101:7_0", lease_s=60)
    held = live.claim_next()
    # a holder whose clock says it claimed 1000 s ago: its lease ran out long ago (a dead task)
    dead = ClaimBoard(rundir, owner="nodeB:202:7_1", lease_s=60, clock=lambda: time.time() - 1000)
    expired = dead.claim_next()
    done_with = live.claim_next()
    live.release(done_with)
    before = _snapshot(rundir.root)

    st = run_status(rundir.root)
    claims = {e["shard"]: e.get("claim") for e in st["shards"]}
    assert claims[held.shard]["state"] == "held" and claims[held.shard]["owner"] == "nodeA:101:7_0"
    assert 0 < claims[held.shard]["expires_in"] <= 60
    assert claims[expired.shard]["state"] == "expired" and claims[expired.shard]["expires_in"] < -900
    assert claims[done_with.shard]["state"] == "released"
    assert st["claims"] == {"counts": {"held": 1, "expired": 1, "released": 1}, "unclaimed": 1}
    text = format_status(st)
    assert "claims: 1 expired, 1 held, 1 released, 1 not claimed yet" in text
    assert f"{expired.shard} (nodeB:202:7_1, " in text and "nodeA:101:7_0" in text
    assert _snapshot(rundir.root) == before  # status reads claims without writing anything

    # a big run lists the claimed units only; the never-claimed ones are counted
    monkeypatch.setattr(status, "MAX_TABLE_ROWS", 2)
    rows = [ln.split()[0] for ln in format_status(st).splitlines() if ln[:5].strip().isdigit()]
    assert len(rows) == 2 and set(rows) <= {str(c.shard) for c in (held, expired, done_with)}
    assert "(not listed: 1 not claimed yet, 1 past the first 2; --json lists all)" in format_status(st)


@pytest.mark.slurm
def test_static_layout_change_refused_while_tasks_are_queued(slurm_cluster, tiny_model, tmp_path):
    """Static mode keeps its refusal (and its manifest); --add-tasks is for dynamic runs only."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    # begin in 10 minutes: the task stays queued for the whole test, then is cancelled
    config = slurm_config(
        tmp_path,
        tiny_model,
        inp,
        "static-layout",
        executor={"num_tasks": 2},
        slurm={"additional_parameters": {"begin": "now+600"}},
    )
    first = submit_run(config)
    try:
        assert first["tasks"] == [0, 1]
        with pytest.raises(HpcRolloutError, match="executor.num_tasks changed from 2 to 3 while tasks"):
            _resume(config.run_dir, "--set", "executor.num_tasks=3")
        assert RunDir(config.run_dir).manifest()["num_tasks"] == 2  # refused before anything was rewritten
        with pytest.raises(HpcRolloutError, match="--add-tasks needs sharding.mode dynamic"):
            _resume(config.run_dir, "--add-tasks", "1")
    finally:
        subprocess.run(["scancel", first["job_id"]], check=True)
    wait_for_jobs([first["job_id"]])


@pytest.mark.slurm
def test_dynamic_array_completes_once_and_an_added_task_joins(slurm_cluster, tiny_model, tmp_path, capsys):
    """2 tasks claim units; both are frozen holding claims; a third added with --add-tasks claims the rest."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))
    ref = make_config(tmp_path / "ref", tiny_model, inp, sharding={"num_shards": 2})
    prepare_run(ref)
    run_task(ref.run_dir, 0)
    merge_run(ref.run_dir, tmp_path / "ref.parquet")

    config = slurm_config(
        tmp_path,
        tiny_model,
        inp,
        "dynamic",
        # a lease far longer than the test: the frozen holders' claims stay held (not expired) however long the
        # added task takes to start on a loaded machine, which the status assertions below rely on
        sharding={"mode": "dynamic", "num_shards": N_SHARDS, "lease_seconds": 1800},
        executor={"num_tasks": 2},
        checkpoint={"every_prompts": 1},
    )
    first = submit_run(config)
    assert first["tasks"] == [0, 1]
    rundir = RunDir(config.run_dir)
    frozen_by_task: dict[int, int] = {}
    frozen = []

    def freeze_claimers() -> bool:
        """SIGSTOP each task as soon as it holds a claim: it keeps holding it, so the added task claims others."""
        for task in (0, 1):
            pid = read_task_record(rundir, task).get("pid")
            if task not in frozen_by_task and pid and _claims_of(rundir, pid):
                os.kill(pid, signal.SIGSTOP)
                frozen_by_task[task] = pid
                frozen.append(pid)
        return len(frozen_by_task) == 2

    try:
        wait_until(freeze_claimers, what="both tasks to claim a unit", interval=0.01)
        held = {c["shard"] for pid in frozen for c in _claims_of(rundir, pid) if not c.get("released")}
        assert held and len(rundir.done_shards()) < N_SHARDS - len(held)

        assert "would submit: 1 task(s) [2]" in dry_run(rundir.load_config(), add_tasks=1)
        assert _resume(rundir.root, "--add-tasks", "1") == 0
        out = capsys.readouterr().out
        assert "submitted array job" in out and "join the 2 queued or running task(s)" in out
        jobs = read_json(rundir.root / "jobs.json")["submissions"]
        assert jobs[-1]["tasks"] == [2] and jobs[-1]["num_tasks"] == 3  # a new label after the running ones
        added = latest_jobs(rundir)[2]

        def added_finished_a_unit() -> bool:
            for shard in rundir.done_shards():
                hb = read_json(rundir.heartbeat(shard))
                if str(hb.get("slurm_job_id")) == added or read_task_record(rundir, 2).get("state") == "done":
                    return True
            return False

        wait_until(added_finished_a_unit, what="the added task to finish a unit")
        st = run_status(rundir.root)
        by_shard = {e["shard"]: e for e in st["shards"]}
        for shard in held:  # the frozen tasks still hold their units, and status says who
            claim = by_shard[shard]["claim"]
            assert claim["state"] == "held" and claim["pid"] in frozen, claim
            assert by_shard[shard]["task"] in (0, 1)
        assert {t["task"] for t in st["tasks"] if t["job_id"]} == {0, 1, 2}
        text = format_status(st)
        assert "claims: " in text and "held" in text and "tasks: " in text
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    history = wait_for_jobs([first["job_id"], added])
    assert len(history) == 3 and all(states[-1] == "COMPLETED" for states in history.values()), history

    assert rundir.done_shards() == set(range(N_SHARDS))
    for task in (0, 1, 2):
        assert read_task_record(rundir, task)["state"] == "done"
    finishers = {str(read_json(rundir.heartbeat(s)).get("slurm_job_id")) for s in range(N_SHARDS)}
    assert added in finishers  # the added task did work, not just exit
    merge_run(rundir.root, tmp_path / "merged.parquet")
    merged = pq.read_table(tmp_path / "merged.parquet")
    keys = sample_keys(merged)
    assert len(keys) == len(set(keys)) == N_PROMPTS * 3
    assert merged.equals(pq.read_table(tmp_path / "ref.parquet"))  # same seeds: same rows however work was split
    st = run_status(rundir.root)
    assert st["complete"] and st["claims"] == {"counts": {}, "unclaimed": 0}
    assert submit_run(rundir.load_config())["tasks"] == []  # complete: nothing more to add
