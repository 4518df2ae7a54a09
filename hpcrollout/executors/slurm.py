"""The SLURM executor: one submitit job array of checkpointable tasks, and what squeue and sacct say about them.

Submission goes through submitit's public ``SlurmExecutor`` (``map_array`` of ``SlurmTask``, slurm_task.py);
the sbatch options come from ``slurm.*`` (``slurm_parameters``). ``sbatch_script`` renders those options as
the script a dry run shows, without submitting and without submitit's private helpers. The scheduler queries
(``squeue_states``, ``sacct_states``) return None where the command is missing, so status falls back to the
run directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import submitit

from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.base import Executor
from hpcrollout.executors.jobs import Submission, record_submission, task_of_job
from hpcrollout.rundir import RunDir

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

log = logging.getLogger(__name__)

ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "STOPPED",
    "RESV_DEL_HOLD",
}
REQUEUE_STATES = {"REQUEUED", "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED"}

# ---------------------------------------------------------------------------------------------- resources
def slurm_parameters(config: RunConfig) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters (sbatch options) for one array task of this config."""
    s = config.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_min,
        "nodes": s.nodes,
        "ntasks_per_node": 1,  # one worker process per node; it drives all the node's GPUs
        "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_delay_s,
        "setup": list(s.setup),
    }
    optional = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint}
    params.update({k: v for k, v in optional.items() if v})
    if s.gpus_per_task:
        params["gres"] = f"gpu:{s.gpus_per_task}"
    if s.mem_gb:
        params["mem"] = f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}MB"
    if s.exclusive:
        params["exclusive"] = True
    if s.array_parallelism:
        params["array_parallelism"] = s.array_parallelism
    if s.additional_parameters:
        params["additional_parameters"] = dict(s.additional_parameters)
    return params


def sbatch_script(rundir: RunDir, config: RunConfig, num_tasks: int) -> str:
    """The sbatch script of an array of num_tasks tasks, as submitit writes it for these parameters (no
    submission): the #SBATCH options, the setup lines, then submitit's runner over the run's submitit folder."""
    params = slurm_parameters(config)
    folder = rundir.submitit_folder
    array = num_tasks > 1  # submitit submits a single task as a plain job, several as an array
    log_name = "%A_%a" if array else "%j"
    logs = str(folder).replace("%j", log_name)
    options: dict[str, Any] = {}
    if array:
        options["array"] = f"0-{num_tasks - 1}%{min(params.get('array_parallelism', 256), num_tasks)}"
    options.update(
        {
            "cpus-per-task": params["cpus_per_task"],
            "error": f"{logs}/{log_name}_0_log.err",
            "job-name": params["job_name"],
            "nodes": params["nodes"],
            "ntasks-per-node": params["ntasks_per_node"],
            "open-mode": "append",
            "output": f"{logs}/{log_name}_0_log.out",
            "signal": f"USR2@{params['signal_delay_s']}",
            "time": params["time"],
            "wckey": "submitit",
        }
    )
    for key in ("partition", "account", "qos", "constraint", "gres", "mem"):
        if key in params:
            options[key] = params[key]
    for key, value in params.get("additional_parameters", {}).items():
        options[key.replace("_", "-")] = value
    lines = ["#!/bin/bash", "", "# Parameters"]
    for key, value in sorted(options.items()):
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    if params.get("exclusive"):
        lines.append("#SBATCH --exclusive")
    lines += ["", "# setup", *params["setup"], "", "# command", "export SUBMITIT_EXECUTOR=slurm"]
    runner = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    out = shlex.quote(f"{logs}/{log_name}_%t_log.out")
    err = shlex.quote(f"{logs}/{log_name}_%t_log.err")
    lines.append(f"srun --unbuffered --output {out} --error {err} {runner}")
    return "\n".join(lines) + "\n"


def make_executor(rundir: RunDir, config: RunConfig) -> submitit.SlurmExecutor:
    try:
        executor = submitit.SlurmExecutor(folder=rundir.submitit_folder, max_num_timeout=config.slurm.max_requeues)
    except RuntimeError as exc:  # no srun on PATH
        raise HpcRolloutError(
            f"executor.type is slurm but this machine has no SLURM client ({exc}); submit from a login node, "
            "or set executor.type: local"
        ) from None
    try:
        executor.update_parameters(**slurm_parameters(config))
    except ValueError as exc:
        raise HpcRolloutError(f"slurm: invalid sbatch parameters: {exc}") from None
    return executor


# ---------------------------------------------------------------------------------------------- scheduler
def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return "" if "Invalid job id" in proc.stderr else None
    return proc.stdout


def squeue_states(array_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Queued/running array tasks: {"123_4": {"state", "reason", "restarts"}}; None without squeue."""
    if not array_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(array_ids), "-O", "JobArrayID:40,State:24,Reason:40,RestartCnt:8"])
    if out is None:
        return None
    states: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            restarts = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
            states[parts[0]] = {"state": parts[1], "reason": parts[2] if len(parts) > 2 else "", "restarts": restarts}
    return states


def sacct_states(array_ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Accounting of array tasks, requeues counted: {"123_4": {"state", "exit_code", "requeues", ...}}; None without sacct."""
    if not array_ids:
        return {}
    cmd = [
        "sacct",
        "-n",
        "-P",
        "-X",
        "-D",
        "-j",
        ",".join(array_ids),
        "-o",
        "JobID,State,ExitCode,Elapsed,NodeList,End",
    ]
    out = _run(cmd)
    if out is None:
        return None
    states: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        f = line.split("|")
        if len(f) < 6 or "[" in f[0] or "." in f[0]:
            continue
        prev = states.get(f[0], {"requeues": 0})
        state = f[1].split()[0] if f[1] else "UNKNOWN"
        # with -D each requeued attempt is its own line, oldest first; the last line is the current attempt
        requeues = prev["requeues"] + (1 if state in REQUEUE_STATES else 0)
        states[f[0]] = {
            "state": state,
            "detail": f[1],
            "exit_code": f[2],
            "elapsed": f[3],
            "node": f[4],
            "requeues": requeues,
        }
    return states


SQUEUE_RETRIES_S = (1.0, 2.0, 4.0, 8.0)  # waits between squeue attempts before submit gives up


def active_tasks(rundir: RunDir, retries_s: tuple[float, ...] = SQUEUE_RETRIES_S) -> dict[int, str]:
    """Tasks of this run queued or running now (squeue), as {task: job id}.

    Submit and resume decide from this what to launch, so a failed squeue (a busy slurmctld times out) is not
    taken for an empty queue: that would launch a second copy of every running task. It is tried again, and
    after the last try this refuses with an error rather than guess.
    """
    jobs = task_of_job(rundir)
    if not jobs or shutil.which("squeue") is None:  # nothing submitted yet; no SLURM here (make_executor says so)
        return {}
    arrays = sorted({j.split("_")[0] for j in jobs})
    queued = squeue_states(arrays)
    for wait in retries_s:
        if queued is not None:
            break
        log.warning("squeue failed for jobs %s of %s; trying again in %.0f s", ",".join(arrays), rundir.root, wait)
        time.sleep(wait)
        queued = squeue_states(arrays)
    if queued is None:
        raise HpcRolloutError(
            f"squeue failed {len(retries_s) + 1} times for the jobs of {rundir.root} ({', '.join(arrays)}): without "
            "it the tasks still queued or running cannot be told apart from finished ones, so nothing was "
            "submitted; try again once slurmctld answers (`squeue -j ...` works)"
        )
    return {jobs[j]: j for j, info in queued.items() if j in jobs and info["state"] in ACTIVE_STATES}


def task_log(rundir: RunDir, job_id: str) -> str:
    """The stderr log submitit keeps for one array task."""
    from submitit.core.utils import JobPaths

    return str(JobPaths(rundir.submitit_folder, job_id=job_id, task_id=0).stderr)


# ---------------------------------------------------------------------------------------------- executor
class SlurmExecutor(Executor):
    """Tasks as one submitit job array; squeue says which are queued or running."""

    name = "slurm"

    def active_tasks(self, rundir: RunDir) -> dict[int, str]:
        return active_tasks(rundir)

    def reserve(self, rundir: RunDir, tasks: list[int]) -> None:
        """Nothing to take: squeue shows the array as soon as sbatch returns, still under the lock."""

    def submit(self, rundir: RunDir, config: RunConfig, tasks: list[int], command: str) -> dict[str, Any]:
        from hpcrollout.executors.slurm_task import SlurmTask

        executor = make_executor(rundir, config)
        try:
            jobs = executor.map_array(SlurmTask(rundir.root.resolve()), tasks)
        except Exception as exc:  # sbatch's own message names the bad option (partition, account, gres...)
            raise HpcRolloutError(
                f"sbatch refused the array for {rundir.root}: {exc}\ncheck the slurm.* settings "
                "(partition, account, qos, gpus_per_task, time_min), or see the script with --dry-run"
            ) from None
        array_id = jobs[0].job_id.split("_")[0]
        entry: Submission = {
            "executor": "slurm",
            "command": command,
            "job_id": array_id,
            "job_ids": [job.job_id for job in jobs],  # ARRAY_INDEX, or a plain id for a single task
            "tasks": tasks,
            "time": time.time(),
            "num_tasks": rundir.manifest()["num_tasks"],
            "host": os.uname().nodename,
            "folder": str(rundir.submitit_folder),
        }
        record_submission(rundir, entry)
        return {"job_id": array_id}
