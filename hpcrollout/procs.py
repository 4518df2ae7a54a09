"""Whether a process recorded in the run directory still runs: host + pid + the pid's start time.

A pid alone is not an identity: after its process exits the kernel may hand the number to another one. The
start time (``/proc/PID/stat`` field 22, clock ticks since boot) tells the two apart. Only processes on this
host can be checked; callers treat another host's process as unknown (and fall back on leases or heartbeats).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def _pid_namespace() -> str | None:
    """This machine's boot and pid namespace: two containers (or nodes) with one hostname still differ here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


PID_NAMESPACE = _pid_namespace()


def process_start(pid: int) -> int | None:
    """The start time of a live process on this host, in clock ticks since boot; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    if not fields or fields[0] == "Z":  # zombies count as dead (some PID 1s never reap)
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    if Path("/proc/self/stat").exists():
        return process_start(pid) is not None
    return True


def same_process_alive(
    host: str | None, pid: int | None, start: int | None, namespace: str | None = None
) -> bool | None:
    """True/False for a process recorded on this host (a different start time: the pid was reused, so False);
    None when it cannot be told here (another host or pid namespace, or nothing recorded)."""
    if host != HOST or pid is None or (namespace is not None and namespace != PID_NAMESPACE):
        return None
    if not pid_alive(pid):
        return False
    if start is not None:
        return process_start(pid) == start
    return True


def this_process() -> dict[str, int | str | None]:
    """host, pid, start time and pid namespace of the calling process, to record."""
    return {"host": HOST, "pid": os.getpid(), "pid_start": process_start(os.getpid()), "pid_ns": PID_NAMESPACE}


def slurm_job_id() -> str | None:
    """The SLURM job of the calling process, as sacct names it: ARRAYJOB_TASK for an array task, else the job id."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")
