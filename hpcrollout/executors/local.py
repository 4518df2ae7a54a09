"""The local executor: array tasks as processes on this machine, with the run-directory semantics of SLURM.

Each task is `python -m hpcrollout.worker RUN_DIR --task N`, exactly what a SLURM array task runs, logging to
RUN_DIR/logs/local-task-N.log. A laptop and a cluster differ only in `executor.type`.

Live local tasks count as running, as SLURM's queued and running tasks do, so a second submit or a resume
never starts a task twice. Each task has a lock file (RunDir.local_task_lock) that its submit takes, under the
run directory's lock, before it records the submission, and holds while the task waits its turn; the worker
process inherits the locked file and holds it until it exits. The lock lives exactly as long as the task does,
whatever kills what: a SIGKILLed submit's queued tasks are free again, its running workers (own sessions, they
survive it) still hold theirs. No pid can be reused into a false "running". Beside it, RunDir.local_task_record
says which pid on which host runs the task, and its exit code once it ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.base import Executor
from hpcrollout.executors.jobs import Submission, record_submission
from hpcrollout.procs import HOST, process_start
from hpcrollout.rundir import RunDir, read_record, write_json_atomic

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

log = logging.getLogger("hpcrollout")


def worker_command(run_dir: str | Path, task: int) -> list[str]:
    return [sys.executable, "-m", "hpcrollout.worker", str(run_dir), "--task", str(task)]


def _try_lock(path: Path, mode: int) -> int | None:
    """An fd holding a non-blocking flock on path, or None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def hold_task_locks(rundir: RunDir, tasks: list[int]) -> dict[int, int]:
    """Lock the tasks about to be run (call under the run directory's lock): {task: fd}. Refuses a task that is
    held already (another submit's or worker's)."""
    fds: dict[int, int] = {}
    for task in tasks:
        fd = None
        for _ in range(20):  # a status probing the lock holds it shared for an instant
            if (fd := _try_lock(rundir.local_task_lock(task), fcntl.LOCK_EX)) is not None:
                break
            time.sleep(0.05)
        if fd is None:
            release_task_locks(fds)
            raise HpcRolloutError(
                f"local task {task} of {rundir.root} is already queued or running ({rundir.local_task_lock(task)} "
                f"is held); follow it with: hpcrollout status {rundir.root}"
            )
        fds[task] = fd
    return fds


def release_task_locks(fds: dict[int, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def local_task_record(rundir: RunDir, task: int) -> dict[str, Any]:
    """The task's record, or {} (never started here, or unreadable)."""
    return read_record(rundir.local_task_record(task))


def local_active_tasks(rundir: RunDir) -> dict[int, str]:
    """Local tasks of this run queued or running now (their lock is held), as {task: "local pid P on HOST"}."""
    active: dict[int, str] = {}
    if not rundir.tasks_dir.is_dir():
        return active
    for path in sorted(rundir.tasks_dir.glob("local-*.lock")):
        stem = path.stem.removeprefix("local-")
        if not stem.isdigit():
            continue
        fd = _try_lock(path, fcntl.LOCK_SH)
        if fd is not None:
            os.close(fd)
            continue
        task = int(stem)
        record = local_task_record(rundir, task)
        if record.get("state") == "running" and record.get("pid"):
            active[task] = f"local pid {record['pid']} on {record.get('host')}"
        else:
            active[task] = f"local, queued in submit pid {record.get('submitter_pid', '?')}"
    return active


@contextlib.contextmanager
def _task_logs(rundir: RunDir) -> Iterator[dict[int, Any]]:
    files: dict[int, Any] = {}
    try:
        yield files
    finally:
        for f in files.values():
            f.close()


def run_local(
    run_dir: str | Path,
    task_ids: list[int],
    parallelism: int = 1,
    env: dict[str, str] | None = None,
    locks: dict[int, int] | None = None,
) -> dict[int, int]:
    """Run the tasks, at most `parallelism` at once; returns each task's exit code.

    locks: the tasks' lock fds, taken by the caller under the run directory's lock (submit); taken here if not
    given. Either way they are released as each task ends.
    """
    rundir = RunDir(run_dir)
    rundir.logs_dir.mkdir(parents=True, exist_ok=True)
    fds = locks if locks is not None else hold_task_locks(rundir, task_ids)  # each fd closed (popped) once
    queue = list(task_ids)
    running: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    submitter = os.getpid()
    try:
        with _task_logs(rundir) as logs:
            while queue or running:
                while queue and len(running) < max(1, parallelism):
                    task = queue.pop(0)
                    logf = logs[task] = open(rundir.local_task_log(task), "ab")
                    # Own session: when the task ends, whatever it left behind (vLLM's engine-core process,
                    # holding GPU memory) is killed with its process group, as SLURM's cgroup does on a cluster.
                    # The lock fd is inherited: the worker holds the task's lock for as long as it lives.
                    proc = subprocess.Popen(
                        worker_command(rundir.root, task),
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        env=child_env,
                        start_new_session=True,
                        pass_fds=(fds[task],),
                    )
                    running[task] = proc
                    write_json_atomic(
                        rundir.local_task_record(task),
                        {
                            "task": task,
                            "state": "running",
                            "pid": proc.pid,
                            "pid_start": process_start(proc.pid),
                            "host": HOST,
                            "submitter_pid": submitter,
                            "started": time.time(),
                            "log": logf.name,
                        },
                    )
                    log.info("task %d started (pid %d, log %s)", task, proc.pid, logf.name)
                for task, proc in list(running.items()):
                    if proc.poll() is not None:
                        _kill_group(proc)
                        logs.pop(task).close()
                        codes[task] = proc.returncode
                        del running[task]
                        _ended(rundir, task, proc.returncode)
                        with contextlib.suppress(OSError):
                            os.close(fds.pop(task))
                        if proc.returncode:
                            log.error(
                                "task %d failed with exit code %d; see %s",
                                task,
                                proc.returncode,
                                rundir.local_task_log(task),
                            )
                        else:
                            log.info("task %d finished", task)
                time.sleep(0.2)
    finally:
        for proc in running.values():
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc)
        release_task_locks(fds)
    return codes


def _ended(rundir: RunDir, task: int, code: int) -> None:
    record = local_task_record(rundir, task)
    record.update(task=task, state="exited", exit_code=code, ended=time.time())
    try:
        write_json_atomic(rundir.local_task_record(task), record)
    except (OSError, HpcRolloutError) as exc:  # a full disk must not lose the other tasks' exit codes
        log.warning("could not record the exit code of local task %d: %s", task, exc)


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalExecutor(Executor):
    """Tasks as processes on this machine, at most executor.local_parallelism at once; run by the submit itself."""

    name = "local"

    def __init__(self) -> None:
        self.locks: dict[int, int] = {}

    def active_tasks(self, rundir: RunDir) -> dict[int, str]:
        return local_active_tasks(rundir)

    def reserve(self, rundir: RunDir, tasks: list[int]) -> None:
        # Locked under the run directory's lock, so a submit right after this one sees these tasks running.
        self.locks.update(hold_task_locks(rundir, tasks))

    def submit(self, rundir: RunDir, config: RunConfig, tasks: list[int], command: str) -> dict[str, Any]:
        # Recorded before running so status can tell a local run from a never-started one.
        entry: Submission = {
            "executor": "local",
            "command": command,
            "tasks": tasks,
            "time": time.time(),
            "num_tasks": rundir.manifest()["num_tasks"],
        }
        record_submission(rundir, entry)
        return {}

    def wait(self, rundir: RunDir, config: RunConfig, tasks: list[int]) -> dict[str, Any]:
        try:
            # Each task's exit code goes to its local task record, which status reads.
            codes = run_local(rundir.root, tasks, config.executor.local_parallelism, locks=self.locks)
        finally:
            self.release()
        return {"exit_codes": codes}

    def release(self) -> None:
        release_task_locks(self.locks)
