"""Dynamic mode end to end: local tasks claim shards; one is killed; the result is still exactly once."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq

from hpcrollout.executors.local import run_local
from hpcrollout.merge import merge_run
from hpcrollout.shard import prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input


def test_dynamic_tasks_share_shards_and_survive_a_killed_task(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(16))
    ref_cfg = make_config(tmp_path / "ref", tiny_model, inp, sharding={"num_shards": 4})
    prepare_run(ref_cfg)
    run_task(ref_cfg.run_dir, 0)
    merge_run(ref_cfg.run_dir, tmp_path / "ref.parquet")

    config = make_config(tmp_path, tiny_model, inp, sharding={"mode": "dynamic", "num_shards": 8, "lease_seconds": 600},
                         executor={"num_tasks": 2})
    rundir = prepare_run(config)
    # a task that dies holding a claim (after its first commit): its shard is taken over at once, its pid gone
    # on this host. The lease is far longer than the test, so a live task starved by a busy machine keeps its
    # units (a 5 s lease let a sibling reclaim a live task's unit and finish it twice).
    dead = subprocess.run([sys.executable, "-m", "hpcrollout.worker", str(rundir.root), "--task", "0"],
                          env={**os.environ, "HPCROLLOUT_CRASH_AT": "after_part:1"}, capture_output=True, timeout=300)
    assert dead.returncode == 137
    assert list(rundir.claims_dir.glob("*.g0"))
    codes = run_local(rundir.root, [0, 1], parallelism=2)
    assert codes == {0: 0, 1: 0}
    assert len(rundir.done_shards()) == 8
    merge_run(rundir.root, tmp_path / "dyn.parquet")
    dyn = pq.read_table(tmp_path / "dyn.parquet")
    ref = pq.read_table(tmp_path / "ref.parquet")
    # same prompts, same seeds: the same samples however the work was split
    assert dyn.equals(ref)
    logs = (rundir.logs_dir / "local-task-0.log").read_text() + (rundir.logs_dir / "local-task-1.log").read_text()
    assert "shard" in logs
