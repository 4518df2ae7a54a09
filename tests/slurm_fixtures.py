"""The `slurm_cluster` fixture: the project's local test SLURM cluster (slurm/start-test-cluster.sh), plus helpers.

In CI (CI=true) a cluster that is not up is a test failure, never a skip: .ci/run starts it before pytest.
Outside CI the fixture starts it with the script when running as root (set HPCROLLOUT_START_SLURM=0 to not),
and otherwise skips with the command that starts it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["slurm_cluster"]  # what `from tests.slurm_fixtures import *` in conftest.py brings in

REPO = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO / "slurm" / "start-test-cluster.sh"


def _cluster_problem() -> str | None:
    """None if sinfo shows a usable node and sacct answers; else what is wrong."""
    for tool in ("sbatch", "squeue", "sinfo", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
        acct = subprocess.run(
            ["sacct", "-n", "-X", "--starttime", "now-1minutes"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo/sacct did not answer: {exc}"
    states = nodes.stdout.split()
    if nodes.returncode != 0 or not any(
        s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states
    ):
        return f"no usable node (sinfo: {nodes.stdout.strip() or nodes.stderr.strip()})"
    if acct.returncode != 0:
        return f"sacct fails (is slurmdbd running?): {acct.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, Any]:
    """A running single-node SLURM cluster with accounting and 4 fake GPUs; yields sinfo facts."""
    problem = _cluster_problem()
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if problem and not in_ci and os.geteuid() == 0 and os.environ.get("HPCROLLOUT_START_SLURM", "1") != "0":
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=600)
        problem = _cluster_problem() if proc.returncode == 0 else f"{START_SCRIPT} failed:\n{proc.stderr[-3000:]}"
    if problem and in_ci:
        # CI started the cluster: a command timing out on a busy machine is not a missing cluster; ask again
        problem = problem_after(_cluster_problem, 120.0)
    if problem:
        message = f"test SLURM cluster not available: {problem}; start it with: sudo bash {START_SCRIPT}"
        if in_ci:
            pytest.fail(message + " (CI=true: the SLURM tests must run)")
        pytest.skip(message)
    info = slurm_output(["sinfo", "-h", "-N", "-o", "%N %c %G"]).split()
    return {"node": info[0], "cpus": int(info[1]), "gres": info[2] if len(info) > 2 else ""}


def problem_after(check: Callable[[], str | None], timeout: float) -> str | None:
    """check() (None, or what is wrong), asked every 2 s until it finds nothing or timeout passes: its last
    answer. For clusters CI started, whose commands may time out on a busy machine."""
    deadline = time.time() + timeout
    while (problem := check()) is not None and time.time() < deadline:
        time.sleep(2)
    return problem


def slurm_output(cmd: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """stdout of a SLURM client command that must succeed, retried while slurmctld is too busy to answer."""
    deadline = time.time() + timeout
    while True:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            if proc.returncode == 0:
                return proc.stdout
            problem = proc.stderr.strip()
        except subprocess.TimeoutExpired:
            problem = "no answer in 60 s"
        if time.time() >= deadline:
            raise AssertionError(f"{' '.join(cmd)} kept failing for {timeout:.0f} s: {problem}")
        time.sleep(2)


def job_states(job_id: str) -> dict[str, str]:
    """squeue's view of an array's tasks ({"12_0": "RUNNING"}); finished tasks are absent."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True)
    if proc.returncode != 0:
        # slurmctld busy (a loaded CI machine) or the job just purged: unknown, never "all finished"
        if "Invalid job id" in proc.stderr:
            return {}
        return {job_id: "UNKNOWN"}
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)


# Scheduler states after which a job (or one attempt of it) does nothing more. REQUEUED is not one of them:
# with `sacct -D` a requeued attempt is its own line and the next attempt follows.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)


def sacct_history(job_id: str) -> list[tuple[str, str]] | None:
    """(JobID, State) of every attempt of a job or array, requeued ones included, oldest first; None if sacct fails."""
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None  # slurmdbd busy: unknown, never "nothing recorded"
    rows = [line.split("|")[:2] for line in proc.stdout.splitlines() if "|" in line]
    # "CANCELLED by 0" -> "CANCELLED"
    return [(job, state.split()[0] if state else "UNKNOWN") for job, state in rows]


def final_states(job_id: str) -> dict[str, list[str]] | None:
    """Each array task's (or the plain job's) states, oldest attempt first, once accounting shows every one of
    them ended; None while any is queued, running or not recorded yet."""
    history = sacct_history(job_id)
    if not history:
        return None
    by_task: dict[str, list[str]] = {}
    for job, state in history:
        by_task.setdefault(job, []).append(state)
    if all(states[-1] in TERMINAL_STATES for states in by_task.values()):
        return by_task
    return None


def wait_for_jobs(job_ids: list[str], timeout: float = 300) -> dict[str, list[str]]:
    """Wait until none of these jobs has a task queued or running (squeue) and accounting (sacct, which lags
    squeue: slurmdbd records a job's end a moment after it leaves the queue) shows every task's final state.

    Returns {task job id: [state of each attempt, oldest first]}, e.g. {"12_0": ["REQUEUED", "COMPLETED"]}, so a
    test asserts the accounting it waited for. No timed asserts: a generous bound, then the jobs are cancelled.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(job_states(j) for j in job_ids):
            finals = [final_states(j) for j in job_ids]
            if all(f is not None for f in finals):
                return {task: states for f in finals for task, states in f.items()}  # type: ignore[union-attr]
        time.sleep(0.5)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(
        f"jobs {job_ids} not ended in squeue and sacct after {timeout}s "
        f"(squeue: {[job_states(j) for j in job_ids]}, sacct: {[sacct_history(j) for j in job_ids]}); cancelled them"
    )


def wait_until(condition, timeout: float = 240, what: str = "condition", interval: float = 0.1) -> None:  # noqa: ANN001
    """Poll condition() until true; fail naming `what` after a generous bound."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def freeze_when(pid_of, condition, what: str) -> int:  # noqa: ANN001
    """SIGSTOP a task's process as soon as condition() holds, so a signal sent next meets it mid-shard.

    Tests run on the cluster's only node, as root, so they can reach the task's process directly; without the
    freeze a tiny model finishes its shard before scancel's signal arrives.
    """
    wait_until(lambda: pid_of() is not None and condition(), what=what, interval=0.01)
    pid = int(pid_of())
    os.kill(pid, signal.SIGSTOP)
    return pid


def wait_signal_pending(pid: int, sig: int, timeout: float = 240) -> None:
    """Wait until sig is pending for a stopped process (delivered by slurmstepd, not yet handled)."""

    def pending() -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True  # gone: nothing left to wait for
        masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
        return any(m & (1 << (sig - 1)) for m in masks)

    wait_until(pending, timeout=timeout, what=f"signal {sig} to reach pid {pid}", interval=0.02)


def sample_keys(merged) -> list[tuple[str, int]]:  # noqa: ANN001 - a pyarrow Table in the merged schema
    """Every (uid, sample index) in a merged table, duplicates kept: the exactly-once check counts these."""
    uids, seeds = merged["uid"].to_pylist(), merged["sample_seeds"].to_pylist()
    return [(uid, i) for uid, s in zip(uids, seeds, strict=True) for i in range(len(s))]
