"""The local executor: array tasks as processes on this machine, with the run-directory semantics of SLURM.

Each task is `python -m hpcrollout.worker RUN_DIR --task N`, exactly what a SLURM array task runs, logging to
RUN_DIR/logs/local-task-N.log. A laptop and a cluster differ only in `executor.type`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcrollout.rundir import RunDir

log = logging.getLogger("hpcrollout")


def worker_command(run_dir: str | Path, task: int) -> list[str]:
    return [sys.executable, "-m", "hpcrollout.worker", str(run_dir), "--task", str(task)]


def run_local(
    run_dir: str | Path, task_ids: list[int], parallelism: int = 1, env: dict[str, str] | None = None
) -> dict[int, int]:
    """Run the tasks, at most `parallelism` at once; returns each task's exit code."""
    rundir = RunDir(run_dir)
    rundir.logs_dir.mkdir(parents=True, exist_ok=True)
    queue = list(task_ids)
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    codes: dict[int, int] = {}
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        while queue or running:
            while queue and len(running) < max(1, parallelism):
                task = queue.pop(0)
                logf = open(rundir.logs_dir / f"local-task-{task}.log", "ab")
                # Own session: when the task ends, whatever it left behind (vLLM's engine-core process, holding
                # GPU memory) is killed with its process group, as SLURM's cgroup does on a cluster.
                proc = subprocess.Popen(
                    worker_command(rundir.root, task),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    start_new_session=True,
                )
                running[task] = (proc, logf)
                log.info("task %d started (pid %d, log %s)", task, proc.pid, logf.name)
            for task, (proc, logf) in list(running.items()):
                if proc.poll() is not None:
                    _kill_group(proc)
                    logf.close()
                    codes[task] = proc.returncode
                    del running[task]
                    if proc.returncode:
                        log.error("task %d failed with exit code %d; see %s", task, proc.returncode, logf.name)
                    else:
                        log.info("task %d finished", task)
            time.sleep(0.2)
    finally:
        for proc, logf in running.values():
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc)
            logf.close()
    return codes


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

