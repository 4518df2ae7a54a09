"""Several engines in one array task (``executor.engines_per_task: K``): K engine processes share the task.

A task that gets a whole node (4 or 8 GPUs) runs K independent engines rather than one engine tensor-parallel
over all of them, when the model fits fewer GPUs. Each engine is ``python -m hpcrollout.worker RUN_DIR --task N
--engine E``: its own process, its own ``CUDA_VISIBLE_DEVICES`` slice of the task's GPUs, its own share of the
task's CPUs. They work like K tasks:

- dynamic mode: every engine claims units on its own, from the run's claim board (claims.py);
- static mode: the engines claim the task's own shards from a board of their own (``rundir.task_engine_claims``,
  one per task attempt), with the same protocol, so an engine that runs out of shards takes the ones its
  siblings have not started, and a shard whose engine died (on this host: its pid gone) is taken over by the
  next sibling that runs out.

Exactly-once rests where it always does: committed parts are reused by whoever finishes the shard, and the shard
output is linked create-if-absent (worker.py). One engine that dies does not stop its siblings; the task ends
when all its engines have, and fails (so SLURM retries it, or ``hpcrollout resume`` reruns it) only if work of
its own is left that no engine finished. Each engine has a record, ``RUN_DIR/tasks/00003.engine-01.json``
(host, pid, GPUs, CPUs, exit code), and a log, ``RUN_DIR/logs/engines/00003-01.log``; heartbeats and done
markers name the engine and its GPUs, which ``hpcrollout status`` shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from hpcrollout.engines import ENGINE_THREADS_VAR, visible_gpu_ids
from hpcrollout.errors import HpcRolloutError
from hpcrollout.procs import HOST, process_start, slurm_job_id
from hpcrollout.rundir import RunDir, read_record, write_json_atomic

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

log = logging.getLogger("hpcrollout")

ENGINE_INDEX_VAR = "HPCROLLOUT_ENGINE_INDEX"  # set in each engine process: its index within the task
ENGINE_CPUS_VAR = "HPCROLLOUT_ENGINE_CPUS"  # the CPUs an engine pins itself to ("0,1,2"), under SLURM


class EngineRecord(TypedDict, total=False):
    """RUN_DIR/tasks/TTTTT.engine-EE.json: written by the task when it starts an engine and when that ends."""

    task: int
    engine: int
    engines: int
    host: str
    pid: int
    pid_start: int | None
    gpus: list[str]
    threads: int
    cpus: list[int]
    log: str
    job_id: str | None
    started: float
    state: str  # running | exited
    exit_code: int | None
    ended: float


# ---------------------------------------------------------------------------------------------- resources
def task_gpu_ids() -> list[str]:
    """The GPUs this task was given: CUDA_VISIBLE_DEVICES (SLURM sets it for --gres), else SLURM's GPU count as
    ids 0..N-1, else the GPUs nvidia-smi lists here; [] when none is known (a CPU task)."""
    visible = visible_gpu_ids()
    if visible or os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return visible
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return [str(i) for i in range(int(value))]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]
    return []


def gpus_per_engine(config: RunConfig) -> int | None:
    """GPUs one engine needs when the config says (tensor x pipeline parallel size); None: an equal share."""
    tp = config.engine.tensor_parallel_size
    return None if tp is None else tp * config.engine.pipeline_parallel_size


def engines_for_task(config: RunConfig, gpus: list[str]) -> int:
    """executor.engines_per_task for a task with these GPUs (auto resolved); a clear error if they do not fit."""
    k = config.executor.engines_per_task
    per = gpus_per_engine(config)
    if k == "auto":
        if not gpus:
            return 1
        return max(1, len(gpus) // (per or config.engine.pipeline_parallel_size))
    if gpus and k * (per or 1) > len(gpus):
        need = f"x {per} GPUs each (engine.tensor_parallel_size x engine.pipeline_parallel_size) " if per else ""
        raise HpcRolloutError(
            f"executor.engines_per_task is {k} {need}but the task has {len(gpus)} GPU(s) "
            f"({', '.join(gpus)}); lower executor.engines_per_task (or set it to auto), or ask for more GPUs "
            "(slurm.gpus_per_task)"
        )
    return int(k)


def expected_engines(config: RunConfig) -> int:
    """executor.engines_per_task as the sharder can know it before any task runs: the number, or for auto the
    GPUs a task will have (slurm.gpus_per_task; the local executor: this machine's) over each engine's GPUs."""
    k = config.executor.engines_per_task
    if k != "auto":
        return int(k)
    slurm = config.executor.type == "slurm"
    return engines_for_task(config, [str(i) for i in range(config.slurm.gpus_per_task)] if slurm else task_gpu_ids())


def gpu_slices(gpus: list[str], k: int, per: int | None) -> list[list[str]]:
    """Each engine's GPUs: consecutive slices of per GPUs (per None: an equal share); [] each without GPUs."""
    if not gpus:
        return [[] for _ in range(k)]
    size = per or max(1, len(gpus) // k)
    slices = [gpus[e * size : (e + 1) * size] for e in range(k)]
    idle = gpus[k * size :]
    if idle:
        log.warning("GPUs %s of this task are left idle: %d engines x %d GPUs each", ",".join(idle), k, size)
    return slices


def cpu_shares(config: RunConfig, k: int) -> tuple[int, list[list[int]]]:
    """Threads per engine, and under SLURM the CPUs each engine pins itself to (the task's CPUs, split in K)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        share = min(int(slurm), len(cpus))
    else:
        share = len(cpus) // max(1, min(config.executor.local_parallelism, config.executor.num_tasks))
    threads = max(1, share // k)
    # Pinned only under SLURM, where the affinity mask is the task's own allocation; locally other tasks share
    # the same CPUs, so the thread count alone keeps the engines from oversubscribing them.
    if not slurm or len(cpus) < k:
        return threads, [[] for _ in range(k)]
    size = len(cpus) // k
    return threads, [cpus[e * size : (e + 1) * size] for e in range(k)]


def pin_engine_cpus() -> None:
    """In an engine process: keep to the CPUs its task gave it (ENGINE_CPUS_VAR), before any thread starts."""
    cpus = os.environ.get(ENGINE_CPUS_VAR, "")
    if cpus:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def engine_index() -> int | None:
    """This process's engine index within its task, when the task runs several engines."""
    value = os.environ.get(ENGINE_INDEX_VAR, "")
    return int(value) if value.isdigit() else None


def engine_identity() -> dict[str, Any]:
    """What heartbeats and done markers record of the engine that made a shard: index, GPUs, host, pid."""
    return {"engine_index": engine_index(), "gpus": visible_gpu_ids(), "host": HOST, "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------- records
def read_engine_record(path: Path) -> dict[str, Any]:
    """An engine record, or {} (absent or unreadable)."""
    return read_record(path)


def engine_command(run_dir: Path, task: int, engine: int, claims_dir: Path | None, engines: int) -> list[str]:
    cmd = [sys.executable, "-m", "hpcrollout.worker", str(run_dir), "--task", str(task), "--engine", str(engine)]
    cmd += ["--engines", str(engines)]
    return cmd + (["--claims", str(claims_dir)] if claims_dir is not None else [])


# ---------------------------------------------------------------------------------------------- the group
def run_engine_group(
    rundir: RunDir, task_id: int, config: RunConfig, k: int, gpus: list[str],
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Start the task's K engines, wait for all of them, and fail only if the task's work is left unfinished."""
    from hpcrollout.worker import task_shards

    dynamic = config.sharding.mode == "dynamic"
    todo = [] if dynamic else task_shards(rundir, task_id)
    summary: dict[str, Any] = {"task": task_id, "engines": [], "results": [], "shards": todo}
    if not dynamic and not todo:
        log.info("task %d: nothing to do", task_id)
        return summary
    claims_dir = None if dynamic else rundir.task_engine_claims(task_id, uuid.uuid4().hex[:12])
    if claims_dir is not None:
        claims_dir.mkdir(parents=True, exist_ok=True)
    slices = gpu_slices(gpus, k, gpus_per_engine(config))
    threads, cpu_lists = cpu_shares(config, k)
    rundir.engine_log(task_id, 0).parent.mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    logs: dict[int, Any] = {}
    log.info("task %d: %d engines, GPUs %s, %d threads each", task_id, k, slices if gpus else "none", threads)
    try:
        for e in range(k):
            env = {**os.environ, ENGINE_INDEX_VAR: str(e), ENGINE_THREADS_VAR: str(threads), "PYTHONUNBUFFERED": "1"}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slices[e])
            if cpu_lists[e]:
                env[ENGINE_CPUS_VAR] = ",".join(map(str, cpu_lists[e]))
            path = rundir.engine_log(task_id, e)
            logs[e] = open(path, "ab")  # noqa: SIM115 - closed in the finally below
            proc = subprocess.Popen(
                engine_command(rundir.root, task_id, e, claims_dir, k), stdout=logs[e], stderr=subprocess.STDOUT, env=env
            )
            procs[e] = proc
            record: EngineRecord = {
                "task": task_id, "engine": e, "engines": k, "host": HOST, "pid": proc.pid,
                "pid_start": process_start(proc.pid), "gpus": slices[e], "threads": threads, "cpus": cpu_lists[e],
                "log": str(path), "job_id": slurm_job_id(), "started": time.time(), "state": "running",
            }
            write_json_atomic(rundir.engine_record(task_id, e), record)
            log.info("task %d: engine %d started (pid %d, GPUs %s, log %s)", task_id, e, proc.pid,
                     ",".join(slices[e]) or "none", path)
        stopping = False
        while procs:
            if not stopping and should_stop is not None and should_stop():
                stopping = True  # SIGTERM: each engine commits what it finished and stops
                for proc in procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            for e, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                codes[e] = proc.returncode
                del procs[e]
                _engine_ended(rundir, task_id, e, proc.returncode)
                if proc.returncode:
                    log.error("task %d: engine %d (pid %d) ended with exit code %d; its siblings go on; see %s",
                              task_id, e, proc.pid, proc.returncode, rundir.engine_log(task_id, e))
                else:
                    log.info("task %d: engine %d finished", task_id, e)
            time.sleep(0.2)
    finally:
        for e, proc in procs.items():  # the task itself is ending (an exception, a signal): take its engines along
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _engine_ended(rundir, task_id, e, proc.returncode)
        for f in logs.values():
            f.close()
    summary["engines"] = [{"engine": e, "exit_code": c, "gpus": slices[e]} for e, c in sorted(codes.items())]
    failed = sorted(e for e, c in codes.items() if c)
    left = _unfinished(rundir, config, task_id)
    if claims_dir is not None and not left:
        shutil.rmtree(claims_dir, ignore_errors=True)
        for parent in (claims_dir.parent, claims_dir.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if empty
    if failed and left and not (should_stop is not None and should_stop()):
        logs_named = ", ".join(str(rundir.engine_log(task_id, e)) for e in failed)
        raise RuntimeError(
            f"task {task_id}: engine(s) {failed} died and shard(s) {left} are unfinished; see {logs_named}; "
            f"hpcrollout resume {rundir.root} finishes them"
        )
    summary["results"] = [{"shard": s, "state": "done"} for s in todo if rundir.is_done(s)]
    return summary


def _unfinished(rundir: RunDir, config: RunConfig, task_id: int) -> list[int]:
    """The work of this task no live engine is doing: static, its shards not done; dynamic, the unfinished
    shards whose claim's holder is known dead (the other tasks' live engines finish the rest)."""
    from hpcrollout.worker import task_shards

    if config.sharding.mode != "dynamic":
        return task_shards(rundir, task_id)
    pending = rundir.pending_shards()
    if not pending or not rundir.claims_dir.is_dir():
        return pending
    from hpcrollout.claims import ClaimBoard

    board = ClaimBoard(rundir, owner="engine-group", order=pending, lease_s=config.sharding.lease_seconds)
    states = board.status()
    return [s for s in pending if states.get(s, {}).get("state") in ("dead", "expired", "released")]


def _engine_ended(rundir: RunDir, task: int, engine: int, code: int | None) -> None:
    path = rundir.engine_record(task, engine)
    record = read_engine_record(path)
    record.update(state="exited", exit_code=code, ended=time.time())
    try:
        write_json_atomic(path, record)
    except (OSError, HpcRolloutError) as exc:  # a full disk must not lose the other engines' exit codes
        log.warning("could not record the exit code of engine %d of task %d: %s", engine, task, exc)
