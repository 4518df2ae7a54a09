"""executor.engines_per_task: K engine processes per task share its work; one SIGKILLed mid-shard loses nothing.

Local executor, transformers backend on CPU. The GPU ids are the fake CUDA_VISIBLE_DEVICES the test gives the
task: each engine gets its own slice, named in the done markers of the shards it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from hpcrollout.worker import committed_parts, run_task
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import sample_keys, wait_until

N_PROMPTS = 12
N_SHARDS = 4


def _engine_pid(rundir: RunDir, engine: int) -> int | None:
    path = rundir.engine_record(0, engine)
    return int(read_json(path)["pid"]) if path.is_file() else None


def _heartbeats(rundir: RunDir, pid: int | None) -> list[dict]:
    """The running heartbeats written by this pid."""
    out = []
    for path in sorted((rundir.root / "heartbeats").glob("*.json")):
        try:
            hb = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced while read
        if hb.get("pid") == pid and hb.get("state") == "running":
            out.append(hb)
    return out


def _stopped(pid: int | None) -> bool:
    """The process is stopped (SIGSTOP: state T in /proc)."""
    try:
        return pid is not None and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


@contextlib.contextmanager
def paused_task(rundir: RunDir, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Task 0 as a worker process in its own session (its engines stop at HPCROLLOUT_PAUSE_AT); killed, with
    them, if the test leaves it running."""
    task = subprocess.Popen([sys.executable, "-m", "hpcrollout.worker", str(rundir.root), "--task", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield task
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
            task.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The input, and its merged output from one engine, uninterrupted."""
    tmp = tmp_path_factory.mktemp("ref")
    inp = write_input(tmp / "in.parquet", make_prompts(N_PROMPTS))
    ref_cfg = make_config(tmp, tiny_model, inp, sharding={"num_shards": N_SHARDS})
    prepare_run(ref_cfg)
    run_task(ref_cfg.run_dir, 0)
    merge_run(ref_cfg.run_dir, tmp / "ref.parquet")
    return inp, pq.read_table(tmp / "ref.parquet")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_engines_share_a_task_and_a_sigkilled_engine_loses_nothing(tmp_path, tiny_model, reference, mode):
    inp, ref = reference

    config = make_config(
        tmp_path, tiny_model, inp, sharding={"num_shards": N_SHARDS, "mode": mode},
        executor={"engines_per_task": 2}, checkpoint={"every_prompts": 1, "every_seconds": 30},
    )
    rundir = prepare_run(config)
    # the task's (fake) GPUs, one each; every engine stops itself (SIGSTOP) right after its first committed part
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "HPCROLLOUT_PAUSE_AT": "after_part"}
    with paused_task(rundir, env) as task:
        # Both engines are stopped mid-shard; engine 1 is SIGKILLed there, engine 0 (alive, with work) goes on.
        for engine in (0, 1):
            wait_until(lambda e=engine: _stopped(_engine_pid(rundir, e)), what=f"engine {engine} to stop mid-shard")
        pid0, pid1 = _engine_pid(rundir, 0), _engine_pid(rundir, 1)
        killed = [hb["shard"] for hb in _heartbeats(rundir, pid1)]
        assert any(committed_parts(rundir, s) for s in killed)  # mid-shard: part of it committed, not finished
        os.kill(pid1, signal.SIGKILL)
        wait_until(lambda: read_json(rundir.engine_record(0, 1)).get("exit_code") == -signal.SIGKILL,
                   what="the task to see engine 1 die")
        st = run_status(rundir.root)
        dead = [e for e in st["engines"] if e["engine"] == 1]
        assert dead[0]["state"] == "exited" and dead[0]["exit_code"] == -9 and dead[0]["gpus"] == ["1"]
        assert f"task 0 engine 1: pid {pid1} on" in format_status(st)
        os.kill(pid0, signal.SIGCONT)
        out, _ = task.communicate(timeout=600)
    # the sibling took the dead engine's shard over (its host-local pid is gone): the task itself succeeds
    assert task.returncode == 0, out.decode()[-3000:]
    assert rundir.done_shards() == set(range(N_SHARDS))
    assert "reclaimed shard" in rundir.engine_log(0, 0).read_text()
    markers = {s: json.loads(rundir.done_marker(s).read_text()) for s in range(N_SHARDS)}
    assert all(markers[s]["engine_index"] == 0 and markers[s]["gpus"] == ["0"] for s in killed)
    assert {(m["engine_index"], tuple(m["gpus"]), m["pid"]) for m in markers.values()} <= {(0, ("0",), pid0), (1, ("1",), pid1)}

    merge_run(rundir.root, tmp_path / "out.parquet")
    merged = pq.read_table(tmp_path / "out.parquet")
    keys = sample_keys(merged)
    assert len(keys) == len(set(keys)) == N_PROMPTS * config.sampling.n  # every (uid, sample) once
    assert merged.equals(ref)  # same prompts, same seeds: equal to the uninterrupted run


def test_default_shards_feed_every_engine_of_a_task(tmp_path, tiny_model):
    """Without sharding.num_shards, a static task with K engines gets SHARDS_PER_ENGINE shards per engine (one
    shard would feed one engine); auto counts slurm.gpus_per_task over each engine's GPUs; dynamic units are
    tapered over every engine of the run."""
    from hpcrollout.claims import tapered_unit_sizes
    from hpcrollout.shard import SHARDS_PER_ENGINE, default_num_shards

    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))

    def shards(**executor) -> int:
        extra = executor.pop("config", {})
        return default_num_shards(make_config(tmp_path, tiny_model, inp, executor=executor, **extra))

    assert shards(num_tasks=3) == 3
    assert shards(num_tasks=3, engines_per_task=2) == 3 * 2 * SHARDS_PER_ENGINE
    slurm = {"slurm": {"gpus_per_task": 8}, "engine": {"tensor_parallel_size": 2}}
    assert shards(type="slurm", num_tasks=2, engines_per_task="auto", config=slurm) == 2 * 4 * SHARDS_PER_ENGINE
    one = {"slurm": {"gpus_per_task": 2}, "engine": {"tensor_parallel_size": 2}}
    assert shards(type="slurm", num_tasks=2, engines_per_task="auto", config=one) == 2  # one engine a task
    config = make_config(
        tmp_path, tiny_model, inp, executor={"num_tasks": 2, "engines_per_task": 3}, sharding={"mode": "dynamic"}
    )
    assert default_num_shards(config) == 8 * 2 * 3
    rundir = prepare_run(config)
    assert rundir.num_shards() == min(N_PROMPTS, len(tapered_unit_sizes(6)))


def test_an_engine_reads_ahead_no_further_than_its_fair_share(tmp_path, tiny_model):
    """Two engines of one static task on its claim board, 8 equal shards: the first engine ready, asking for
    more while its work is in flight, stops at half the task's work (its siblings' half stays claimable); with
    nothing in flight it claims again, and the share never stops it from taking what no one else took."""
    from hpcrollout.claims import ClaimBoard, expected_work
    from hpcrollout.worker import ShardSource, task_shards

    inp = write_input(tmp_path / "in.parquet", make_prompts(16))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 8})
    rundir = prepare_run(config)
    claims = tmp_path / "claims"
    claims.mkdir()
    total = sum(expected_work(rundir.manifest()))

    def source(owner: str) -> ShardSource:
        board = ClaimBoard(rundir, owner, order=task_shards(rundir, 0), claims_dir=claims)
        return ShardSource(rundir, board=board, claimants=2)  # its share: total / 2

    first, second = source("engine0"), source("engine1")
    got = [first.next(block=True)]  # each engine's first unit, before its engine starts
    got.append(second.next(block=True))
    while (shard := first.next(block=False)) is not None:  # engine 0 is ready first and reads ahead
        got.append(shard)
    assert first.held_back == 1 and not first.exhausted
    assert first.holding() >= total / 2 and len(first.claims) == 4  # 8 equal shards: its half
    while (shard := second.next(block=False)) is not None:
        got.append(shard)
    assert sorted(got) == list(range(8)) and len(second.claims) == 4
    for shard in list(first.claims):  # engine 0 finishes its units: nothing is left for it, nothing duplicated
        first.release(shard)
    assert first.next(block=False) is None and first.next(block=True) is None and first.exhausted
    first.release_all()
    second.release_all()


def test_two_engines_both_work_on_the_default_shards(tmp_path, tiny_model, reference):
    """The default config of a whole-node task (engines_per_task 2, no sharding.num_shards): both engines get
    shards (one shard per task would have fed one engine), and the output is the one-engine run's."""
    inp, ref = reference
    config = make_config(tmp_path, tiny_model, inp, executor={"engines_per_task": 2})
    rundir = prepare_run(config)
    assert rundir.num_shards() == 2 * 4  # SHARDS_PER_ENGINE for each of the 2 engines
    # Each engine stops itself after its first committed part. Engine loads differ by seconds on a busy machine
    # while 8 tiny shards take about one: without this the first engine ready could finish every shard alone.
    # Once both are stopped, each holds a shard of its own; both go on.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "HPCROLLOUT_PAUSE_AT": "after_part"}
    with paused_task(rundir, env) as task:
        for engine in (0, 1):
            wait_until(lambda e=engine: _stopped(_engine_pid(rundir, e)), what=f"engine {engine} to stop after a part")
        for engine in (0, 1):
            os.kill(_engine_pid(rundir, engine), signal.SIGCONT)
        out, _ = task.communicate(timeout=600)
    assert task.returncode == 0, out.decode()[-3000:]
    assert rundir.done_shards() == set(range(8))
    markers = [json.loads(rundir.done_marker(s).read_text()) for s in range(8)]
    assert {m["engine_index"] for m in markers} == {0, 1}  # each engine finished shards of its own
    merge_run(rundir.root, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").equals(ref)
