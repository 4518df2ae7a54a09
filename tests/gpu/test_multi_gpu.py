"""Several GPUs of one host (issue 17): a tensor-parallel engine, and two engines in one task, one GPU each.

- TP=2: n samples per prompt, the seeds recorded (prompt seed + i), and a worker killed after its second commit
  and resumed yields exactly the merged output of an uninterrupted TP=2 run;
- ``executor.engines_per_task: 2``: both engines claim work (each stops itself after its first committed part,
  HPCROLLOUT_PAUSE_AT, until both have), and the merged output equals one engine's (batch-invariant mode, the
  same seeds; the one-engine reference is the suite's shared TP=1 engine);
- SIGKILL of one of the two engines mid-shard: the other finishes its shard; nothing lost or doubled.

Skipped with fewer than 2 CUDA GPUs. Every subprocess runs in its own session and is killed with its group at
the end: a killed worker leaves vLLM's engine-core (and TP worker) processes orphaned, holding GPU memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import make_prompts, write_input
from tests.gpu.conftest import REPO
from tests.slurm_fixtures import sample_keys, wait_until
from tests.test_engines_per_task import _engine_pid, _heartbeats, _stopped

pytestmark = pytest.mark.gpu

N_PROMPTS = 16
N_SHARDS = 4
# the task's two GPUs: the first two visible (each engine gets one, named in its done markers)
GPUS = ([g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()] or ["0", "1"])[:2]
COLUMNS = ("uid", "sample_seeds", "token_ids", "responses", "response_tokens", "prompt_tokens")


@pytest.fixture(scope="module")
def two_gpus(gpu_env: dict[str, str]) -> dict[str, str]:
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {count} visible (run on nvidia-h200-x2: run_on_device.sh multi-gpu)")
    return gpu_env


def _config(make_config, tmp: Path, inp: Path, **over: Any):  # noqa: ANN001
    tree: dict[str, Any] = {
        "run_dir": str(tmp / "run"),
        "data": {"input": str(inp)},
        "sampling": {"return_token_ids": True},
        "checkpoint": {"every_prompts": 4, "every_seconds": 30},
    }
    tree.update(over)
    return make_config(tree)


def _merged(rundir_root: Path, out: Path):  # noqa: ANN202
    from hpcrollout.merge import merge_run

    merge_run(rundir_root, out)
    return pq.read_table(out)


def _assert_same(merged, expected, n: int, what: str) -> None:  # noqa: ANN001
    keys = sample_keys(merged)
    assert len(keys) == len(set(keys)) == N_PROMPTS * n, f"{what}: samples lost or doubled"
    assert merged.column("error").null_count == merged.num_rows
    for name in COLUMNS:
        assert merged.column(name).equals(expected.column(name)), f"{name} differs: {what}"


def _run_group(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphaned engine cores of a killed engine
        proc.wait()


def _start(rundir_root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpcrollout.worker", str(rundir_root), "--task", "0"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_tp2_engine_samples_n_with_seeds_and_reproduces_across_kill_and_resume(two_gpus, make_config, tmp_path):
    from hpcrollout.engines.base import prompt_seed
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.rundir import RunDir
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_shard

    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))
    tp2 = {"engine": {"tensor_parallel_size": 2}, "sharding": {"num_shards": 1}}
    ref_config = _config(make_config, tmp_path / "reference", inp, **tp2)
    engine = VllmEngine(ref_config)
    try:
        assert engine.describe()["tensor_parallel_size"] == 2
        ref_run = prepare_run(ref_config)
        assert run_shard(ref_run, 0, engine, ref_config)["state"] == "done"
        expected = _merged(ref_run.root, tmp_path / "reference" / "merged.parquet")
        n, seed = ref_config.sampling.n, ref_config.sampling.seed
        for uid, seeds, responses in zip(
            expected["uid"].to_pylist(),
            expected["sample_seeds"].to_pylist(),
            expected["responses"].to_pylist(),
            strict=True,
        ):
            assert len(responses) == n and seeds == [prompt_seed(seed, uid) + i for i in range(n)]

        config = _config(make_config, tmp_path / "crashed", inp, **tp2)
        rundir = prepare_run(config)
        code, log = _run_group(_start(rundir.root, {**two_gpus, "HPCROLLOUT_CRASH_AT": "after_part:2"}))
        assert code == 137, log[-4000:]
        assert len(sorted(RunDir(rundir.root).parts_dir(0).glob("part-*.parquet"))) == 2  # two commits survived

        assert run_shard(RunDir(rundir.root), 0, VllmEngine(config, llm=engine.llm), config)["state"] == "done"
        _assert_same(
            _merged(rundir.root, tmp_path / "crashed" / "merged.parquet"), expected, n, "TP=2 after kill and resume"
        )
    finally:
        engine.close()


@pytest.fixture(scope="module")
def one_engine_reference(two_gpus, shared_llm, make_config, tmp_path_factory):  # noqa: ANN001, ANN201
    """The input, and its merged output from the suite's one TP=1 engine, uninterrupted."""
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_shard

    tmp = tmp_path_factory.mktemp("one-engine")
    inp = write_input(tmp / "in.parquet", make_prompts(N_PROMPTS))
    config = _config(make_config, tmp, inp, sharding={"num_shards": N_SHARDS})
    rundir = prepare_run(config)
    for shard in range(N_SHARDS):  # what one engine's task does, through the suite's shared engine
        assert run_shard(rundir, shard, VllmEngine(config, llm=shared_llm.llm), config)["state"] == "done"
    return inp, _merged(rundir.root, tmp / "merged.parquet")


def _two_engine_run(make_config, tmp: Path, inp: Path, env: dict[str, str]):  # noqa: ANN001, ANN202
    from hpcrollout.shard import prepare_run

    config = _config(
        make_config,
        tmp,
        inp,
        sharding={"num_shards": N_SHARDS},
        executor={"engines_per_task": 2},
        checkpoint={"every_prompts": 1, "every_seconds": 30},
    )
    rundir = prepare_run(config)
    task_env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(GPUS), "HPCROLLOUT_PAUSE_AT": "after_part"}
    return config, rundir, _start(rundir.root, task_env)


def _markers(rundir) -> dict[int, dict]:  # noqa: ANN001
    return {s: json.loads(rundir.done_marker(s).read_text()) for s in range(N_SHARDS)}


def test_two_engines_one_gpu_each_claim_work_and_merge_to_the_one_engine_output(
    two_gpus, make_config, one_engine_reference, tmp_path
):
    inp, expected = one_engine_reference
    config, rundir, task = _two_engine_run(make_config, tmp_path, inp, two_gpus)
    try:
        # each engine stops itself after its first committed part: both have claimed a shard and generated
        for engine in (0, 1):
            wait_until(
                lambda e=engine: _stopped(_engine_pid(rundir, e)),
                timeout=400,
                what=f"engine {engine} to commit its first part",
            )
        pids = [_engine_pid(rundir, e) for e in (0, 1)]
        working = [{hb["shard"] for hb in _heartbeats(rundir, pid)} for pid in pids]
        assert working[0] and working[1] and not working[0] & working[1], working
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        code, log = _run_group(task)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(task.pid, signal.SIGKILL)
    assert code == 0, log[-4000:]
    assert rundir.done_shards() == set(range(N_SHARDS))
    markers = _markers(rundir)
    assert {m["engine_index"] for m in markers.values()} == {0, 1}  # both engines finished shards
    assert {(m["engine_index"], tuple(m["gpus"])) for m in markers.values()} == {(0, (GPUS[0],)), (1, (GPUS[1],))}
    _assert_same(_merged(rundir.root, tmp_path / "merged.parquet"), expected, config.sampling.n, "two engines vs one")


def test_sigkill_of_one_engine_its_shard_is_finished_by_the_other(
    two_gpus, make_config, one_engine_reference, tmp_path
):
    inp, expected = one_engine_reference
    config, rundir, task = _two_engine_run(make_config, tmp_path, inp, two_gpus)
    try:
        for engine in (0, 1):
            wait_until(
                lambda e=engine: _stopped(_engine_pid(rundir, e)),
                timeout=400,
                what=f"engine {engine} to stop mid-shard",
            )
        pid0, pid1 = _engine_pid(rundir, 0), _engine_pid(rundir, 1)
        from hpcrollout.rundir import read_json
        from hpcrollout.worker import committed_parts

        killed = [hb["shard"] for hb in _heartbeats(rundir, pid1)]
        assert killed and any(committed_parts(rundir, s) for s in killed)  # mid-shard: part committed
        os.kill(pid1, signal.SIGKILL)
        wait_until(
            lambda: read_json(rundir.engine_record(0, 1)).get("exit_code") == -signal.SIGKILL,
            what="the task to see engine 1 die",
        )
        os.kill(pid0, signal.SIGCONT)
        code, log = _run_group(task)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(task.pid, signal.SIGKILL)
    assert code == 0, log[-4000:]
    assert rundir.done_shards() == set(range(N_SHARDS))
    assert "reclaimed shard" in rundir.engine_log(0, 0).read_text()
    markers = _markers(rundir)
    assert all(markers[s]["engine_index"] == 0 and markers[s]["gpus"] == [GPUS[0]] for s in killed)
    _assert_same(
        _merged(rundir.root, tmp_path / "merged.parquet"), expected, config.sampling.n, "after SIGKILL of engine 1"
    )
