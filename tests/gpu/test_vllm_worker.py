"""The real worker with the vLLM backend: a worker process killed after its second commit, resumed by another
engine, yields exactly the merged output of an uninterrupted run (same rows, seeds and token ids)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import make_prompts, write_input
from tests.gpu.conftest import REPO

pytestmark = pytest.mark.gpu

N_PROMPTS = 20


def _config(make_config, tmp: Path, inp: Path):
    return make_config(
        {
            "run_dir": str(tmp / "run"),
            "data": {"input": str(inp)},
            "sampling": {"return_token_ids": True, "logprobs": True},
            "sharding": {"num_shards": 1},
            "checkpoint": {"every_prompts": 4, "every_seconds": 30},
        }
    )


def test_worker_killed_and_resumed_reproduces_the_uninterrupted_run(shared_llm, make_config, tmp_path, gpu_env):
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.merge import merge_run
    from hpcrollout.rundir import RunDir
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_shard

    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))

    ref_dir = tmp_path / "reference"
    ref_config = _config(make_config, ref_dir, inp)
    ref_run = prepare_run(ref_config)
    run_shard(ref_run, 0, VllmEngine(ref_config, llm=shared_llm.llm), ref_config)
    merge_run(ref_run.root, ref_dir / "merged.parquet")
    expected = pq.read_table(ref_dir / "merged.parquet")

    config = _config(make_config, tmp_path / "crashed", inp)
    rundir = prepare_run(config)
    # Its own session: the kill leaves vLLM's engine-core process orphaned, and it is killed with the group below.
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpcrollout.worker", str(rundir.root), "--task", "0"],
            env={**gpu_env, "HPCROLLOUT_CRASH_AT": "after_part:2"},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=400)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == 137, log_path.read_text()[-4000:]
    parts = sorted(RunDir(rundir.root).parts_dir(0).glob("part-*.parquet"))
    assert len(parts) == 2  # two commits survived the kill

    result = run_shard(RunDir(rundir.root), 0, VllmEngine(config, llm=shared_llm.llm), config)
    assert result["state"] == "done"
    merge_run(rundir.root, tmp_path / "crashed" / "merged.parquet")
    merged = pq.read_table(tmp_path / "crashed" / "merged.parquet")

    assert merged.num_rows == N_PROMPTS and merged.column("error").null_count == N_PROMPTS
    keys = [
        (u, i)
        for u, s in zip(merged["uid"].to_pylist(), merged["sample_seeds"].to_pylist(), strict=True)
        for i in range(len(s))
    ]
    assert len(keys) == len(set(keys)) == N_PROMPTS * 4
    for name in ("uid", "sample_seeds", "token_ids", "responses", "response_tokens", "prompt_tokens"):
        assert merged.column(name).equals(expected.column(name)), f"{name} differs after kill and resume"
