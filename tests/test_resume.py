"""Kill a worker at many points, resume, and prove every (uid, sample) exists exactly once and equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input

N_PROMPTS = 14


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted run: the merged table every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    inp = write_input(tmp / "in.parquet", make_prompts(N_PROMPTS))
    config = make_config(tmp, tiny_model, inp, sharding={"num_shards": 2})
    prepare_run(config)
    run_task(config.run_dir, 0)
    merge_run(config.run_dir, tmp / "merged.parquet")
    return inp, pq.read_table(tmp / "merged.parquet")


def _worker(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpcrollout.worker", str(run_dir), "--task", "0"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _assert_exactly_once(merged, reference) -> None:
    keys = [(uid, i) for uid, seeds in zip(merged["uid"].to_pylist(), merged["sample_seeds"].to_pylist()) for i in range(len(seeds))]
    assert len(keys) == len(set(keys)) == N_PROMPTS * 3
    assert merged.num_rows == N_PROMPTS
    assert merged.equals(reference), "resumed output differs from the uninterrupted run"


@pytest.mark.parametrize("crash_at", ["after_part:1", "after_part:3", "after_part:5", "after_output:1", "after_output:2"])
def test_crash_at_named_points_then_resume(tiny_model, tmp_path, reference, crash_at):
    inp, expected = reference
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 2})
    prepare_run(config)
    proc = _worker(Path(config.run_dir), {"HPCROLLOUT_CRASH_AT": crash_at})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 137, out.decode()[-2000:]
    rundir = RunDir(config.run_dir)
    assert len(rundir.done_shards()) < 2
    run_task(config.run_dir, 0)  # the resume
    merge_run(config.run_dir, tmp_path / "merged.parquet")
    _assert_exactly_once(pq.read_table(tmp_path / "merged.parquet"), expected)


def test_sigkill_midway_then_resume(tiny_model, tmp_path, reference):
    """A real SIGKILL at an arbitrary instant (once some parts are committed), twice, then resume."""
    inp, expected = reference
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 2}, checkpoint={"every_prompts": 1})
    rundir = prepare_run(config)
    for wanted_parts in (2, 5):
        proc = _worker(rundir.root)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            parts = list((rundir.root / "parts").rglob("part-*.parquet")) if (rundir.root / "parts").exists() else []
            if len(parts) + 2 * len(rundir.done_shards()) >= wanted_parts:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_task(rundir.root, 0)
    merge_run(rundir.root, tmp_path / "merged.parquet")
    _assert_exactly_once(pq.read_table(tmp_path / "merged.parquet"), expected)


def test_duplicate_parts_keep_one_copy(tiny_model, tmp_path, reference):
    """Parts committed twice (a flush racing a commit, or two tasks on one shard) still give one row per prompt."""
    inp, expected = reference
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 2})
    rundir = prepare_run(config)
    proc = _worker(rundir.root, {"HPCROLLOUT_CRASH_AT": "after_part:3"})
    proc.communicate(timeout=300)
    parts = sorted((rundir.root / "parts").rglob("part-*.parquet"))
    assert parts
    for p in parts:  # every committed part appears twice
        (p.parent / p.name.replace("part-", "part-9")).write_bytes(p.read_bytes())
    run_task(rundir.root, 0)
    merge_run(rundir.root, tmp_path / "merged.parquet")
    _assert_exactly_once(pq.read_table(tmp_path / "merged.parquet"), expected)


def test_resume_skips_committed_work(tiny_model, tmp_path, reference):
    inp, _ = reference
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 1}, checkpoint={"every_prompts": 1})
    rundir = prepare_run(config)
    proc = _worker(rundir.root, {"HPCROLLOUT_CRASH_AT": "after_part:6"})
    proc.communicate(timeout=300)
    summary = run_task(rundir.root, 0)
    (result,) = summary["results"]
    assert result["prompts_this_attempt"] == N_PROMPTS - 6


def test_demo_pipeline_killed_task_resumes_to_identical_output(tmp_path):
    """configs/demo.yaml as a 2-task local array; task 1 is SIGKILLed mid-shard; resume; equal to a clean run."""
    import yaml

    from hpcrollout.config import build_config
    from hpcrollout.demo import DEMO_CONFIG, demo_prompts
    from hpcrollout.executors.local import run_local
    from hpcrollout.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    inp = tmp_path / "input.parquet"
    pq.write_table(demo_prompts(12), inp)

    def config(name: str):
        tree = yaml.safe_load(DEMO_CONFIG.read_text())
        tree.update(run_dir=str(tmp_path / name))
        tree["data"]["input"], tree["model"]["path"] = str(inp), str(model)
        tree["sampling"]["max_tokens"] = 16
        tree["checkpoint"]["every_prompts"] = 1
        return build_config(tree)

    clean = prepare_run(config("clean"))
    assert run_local(clean.root, [0, 1], parallelism=2) == {0: 0, 1: 0}
    merge_run(clean.root, tmp_path / "clean.parquet")

    rundir = prepare_run(config("killed"))
    victim = _worker(rundir.root, {})  # task 0 (shards 0 and 2)
    deadline = time.time() + 120
    while time.time() < deadline and not list(rundir.parts_dir(0).glob("part-*.parquet")):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert rundir.pending_shards()
    assert run_local(rundir.root, [0, 1], parallelism=2) == {0: 0, 1: 0}
    merge_run(rundir.root, tmp_path / "resumed.parquet")
    resumed = pq.read_table(tmp_path / "resumed.parquet")
    assert resumed.equals(pq.read_table(tmp_path / "clean.parquet"))
    keys = [(u, s) for u, seeds in zip(resumed["uid"].to_pylist(), resumed["sample_seeds"].to_pylist()) for s in seeds]
    assert len(keys) == len(set(keys)) == 12 * 4
