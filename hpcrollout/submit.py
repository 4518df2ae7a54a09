"""Launch a run's array: prepare (or reopen) the run directory, then submit the unfinished tasks.

`python -m hpcrollout.submit --config big.yaml` (or `hpcrollout submit`). With executor.type slurm this is one
submitit job array (`map_array`) of checkpointable tasks; with executor.type local the tasks run here.
Submitting again with the same config, or `hpcrollout resume RUN_DIR`, submits only tasks that still have
shards without a completion marker and are not queued or running already. Every submission is recorded in
RUN_DIR/jobs.json, which `hpcrollout status` uses to ask sacct/squeue about the tasks.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hpcrollout.config import RunConfig, load_config
from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir, write_json_atomic
from hpcrollout.slurm_task import SlurmTask
from hpcrollout.status import active_tasks, jobs_path, read_jobs, submitit_folder

log = logging.getLogger("hpcrollout")


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


def _python() -> str:
    return shlex.quote(sys.executable)


def sbatch_script(rundir: RunDir, config: RunConfig, num_tasks: int) -> str:
    """The sbatch script submitit would submit for an array of num_tasks tasks (no submission)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{_python()} -u -m submitit.core._submit {shlex.quote(str(submitit_folder(rundir)))}"
    try:
        # submitit submits a single task as a plain job, several as an array
        map_count = num_tasks if num_tasks > 1 else None
        return _make_sbatch_string(
            command=command, folder=submitit_folder(rundir), map_count=map_count, **slurm_parameters(config)
        )
    except (TypeError, ValueError) as exc:
        raise HpcRolloutError(f"slurm: cannot build the sbatch script: {exc}") from None


def make_executor(rundir: RunDir, config: RunConfig):  # -> submitit.SlurmExecutor
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=submitit_folder(rundir), max_num_timeout=config.slurm.max_requeues)
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


# ---------------------------------------------------------------------------------------------- which tasks
def tasks_with_pending_shards(rundir: RunDir) -> list[int]:
    """Tasks (static assignment: shard s belongs to task s % num_tasks) that have a shard without a marker."""
    manifest = rundir.manifest()
    num_tasks = int(manifest["num_tasks"])
    done = rundir.done_shards()
    pending = [s["shard"] for s in manifest["shards"] if s["shard"] not in done]
    if manifest.get("mode") == "dynamic":  # tasks claim shards: enough tasks for what is left
        return list(range(min(num_tasks, len(pending))))
    return sorted({s % num_tasks for s in pending})


def shards_of_task(manifest: dict[str, Any], task_id: int) -> list[int]:
    num_tasks = int(manifest["num_tasks"])
    return [s["shard"] for s in manifest["shards"] if s["shard"] % num_tasks == task_id]


def _check_task_layout(rundir: RunDir, active: dict[int, str]) -> None:
    """Refuse to change the number of tasks while tasks of the old layout still run: they would share shards."""
    jobs = read_jobs(rundir)
    if not active or not jobs["submissions"]:
        return
    last = jobs["submissions"][-1].get("num_tasks")
    now = rundir.manifest()["num_tasks"]
    if last is not None and last != now:
        raise HpcRolloutError(
            f"executor.num_tasks changed from {last} to {now} while tasks of {rundir.root} are still queued or "
            f"running (jobs {', '.join(sorted(set(active.values())))}); wait for them or scancel them, then submit again"
        )


# ---------------------------------------------------------------------------------------------- submit
def record_submission(rundir: RunDir, entry: dict[str, Any]) -> None:
    """Append one submission to RUN_DIR/jobs.json (atomically; callers hold the run directory's lock)."""
    jobs = read_jobs(rundir)
    jobs["submissions"].append(entry)
    write_json_atomic(jobs_path(rundir), jobs)


def submit_run(
    config: RunConfig, *, force: bool = False, command: str = "submit", tasks: list[int] | None = None
) -> dict[str, Any]:
    """Prepare or reopen the run directory and launch its unfinished tasks; returns what was submitted."""
    from hpcrollout.shard import prepare_run

    config.require("run_dir")
    rundir = RunDir(config.run_dir)
    with rundir.lock(command):
        rundir = prepare_run(config, force=force)
        wanted = tasks_with_pending_shards(rundir)
        if tasks is not None:
            wanted = [t for t in wanted if t in set(tasks)]
        result: dict[str, Any] = {
            "run_dir": str(rundir.root),
            "executor": config.executor.type,
            "tasks": [],
            "active": {},
        }
        if config.executor.type == "slurm":
            active = active_tasks(rundir)
            _check_task_layout(rundir, active)
            result["active"] = active
            wanted = [t for t in wanted if t not in active]
        if not wanted:
            return result
        result["tasks"] = wanted
        if config.executor.type == "local":
            # Recorded before running so status can tell a local run from a never-started one.
            record_submission(
                rundir,
                {
                    "executor": "local",
                    "command": command,
                    "tasks": wanted,
                    "time": time.time(),
                    "num_tasks": rundir.manifest()["num_tasks"],
                },
            )
        else:
            executor = make_executor(rundir, config)
            try:
                jobs = executor.map_array(SlurmTask(rundir.root.resolve()), wanted)
            except Exception as exc:  # sbatch's own message names the bad option (partition, account, gres...)
                raise HpcRolloutError(
                    f"sbatch refused the array for {rundir.root}: {exc}\ncheck the slurm.* settings "
                    "(partition, account, qos, gpus_per_task, time_min), or see the script with --dry-run"
                ) from None
            array_id = jobs[0].job_id.split("_")[0]
            entry = {
                "executor": "slurm",
                "command": command,
                "job_id": array_id,
                "job_ids": [job.job_id for job in jobs],  # ARRAY_INDEX, or a plain id for a single task
                "tasks": wanted,
                "time": time.time(),
                "num_tasks": rundir.manifest()["num_tasks"],
                "host": os.uname().nodename,
                "folder": str(submitit_folder(rundir)),
            }
            record_submission(rundir, entry)
            result["job_id"] = array_id
    if config.executor.type == "local":
        from hpcrollout.local import run_local

        result["exit_codes"] = run_local(rundir.root, wanted, config.executor.local_parallelism)
        # For status: a local task that exited non-zero is failed even if it died before its first heartbeat.
        jobs = read_jobs(rundir)
        for sub in reversed(jobs["submissions"]):
            if sub.get("executor") == "local" and sub.get("tasks") == wanted:
                sub["exit_codes"] = {str(t): c for t, c in result["exit_codes"].items()}
                break
        write_json_atomic(jobs_path(rundir), jobs)
    return result


# ---------------------------------------------------------------------------------------------- dry run
def dry_run(config: RunConfig, *, force: bool = False, out=None) -> str:
    """What submit would do, as text: shards, tasks, resources and the sbatch script. Writes nothing."""
    config.require("run_dir", "data.input", "model.path")
    rundir = RunDir(config.run_dir)
    lines = ["dry run: nothing is written or submitted"]
    if rundir.exists():
        manifest = _reopen_check(rundir, config, force)
        shards, done = manifest["shards"], rundir.done_shards()
        num_tasks = config.executor.num_tasks
        lines.append(f"run dir: {rundir.root} (exists: {len(done)} of {len(shards)} shards done)")
    else:
        shards, done = _plan_shards(config), set()
        num_tasks = config.executor.num_tasks
        lines.append(f"run dir: {rundir.root} (new: would be created and sharded)")
    pending = [s for s in shards if s["shard"] not in done]
    if config.sharding.mode == "dynamic":
        tasks = list(range(min(num_tasks, len(pending))))
    else:
        tasks = sorted({s["shard"] % num_tasks for s in pending})
    active = active_tasks(rundir) if rundir.exists() and config.executor.type == "slurm" else {}
    tasks = [t for t in tasks if t not in active]
    total = sum(s["rows"][1] - s["rows"][0] for s in shards)
    lines.append(
        f"input: {config.data.input} ({total} prompts x n={config.sampling.n}); model: {config.model.path}; backend: {config.backend}"
    )
    lines.append(f"shards: {len(shards)} ({len(pending)} to run), tasks: {num_tasks} ({config.sharding.mode})")
    lines.append(f"  {'shard':>5} {'rows':>17} {'prompts':>8} {'est_work':>10} {'task':>5} state")
    for s in shards:
        a, b = s["rows"]
        state = "done" if s["shard"] in done else "to run"
        task = s["shard"] % num_tasks if config.sharding.mode == "static" else "-"
        lines.append(f"  {s['shard']:>5} {f'{a}-{b}':>17} {b - a:>8} {s.get('est_work', 0):>10.0f} {task:>5} {state}")
    for task, job in sorted(active.items()):
        lines.append(f"task {task} is queued or running as job {job}: would not be resubmitted")
    if not tasks:
        lines.append("nothing to submit" + ("" if active else ": every shard is done"))
        return "\n".join(lines)
    lines.append(f"would submit: {len(tasks)} task(s) {_ranges(tasks)} via executor {config.executor.type}")
    if config.executor.type == "local":
        lines.append(f"local: {config.executor.local_parallelism} task(s) at once on this machine")
        return "\n".join(lines)
    params = slurm_parameters(config)
    res = {k: v for k, v in params.items() if k not in ("setup", "additional_parameters")}
    lines.append("resources per task: " + ", ".join(f"{k}={v}" for k, v in res.items()))
    lines.append(
        f"requeues on timeout/preemption: {config.slurm.max_requeues}; retries after an error: {config.slurm.max_retries}"
    )
    lines.append("sbatch script:")
    lines.append(sbatch_script(rundir, config, len(tasks)))
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return "[" + ",".join(out) + "]"


def _plan_shards(config: RunConfig) -> list[dict[str, Any]]:
    """The shard table prepare_run would write, computed in memory."""
    from hpcrollout import shard

    _, work, ranges = shard.plan_input(config)
    return [{"shard": i, "rows": [a, b], "est_work": float(work[a:b].sum())} for i, (a, b) in enumerate(ranges)]


def _reopen_check(rundir: RunDir, config: RunConfig, force: bool) -> dict[str, Any]:
    """The refusal prepare_run would give on reopening, without its writes."""
    from hpcrollout import shard

    manifest = rundir.manifest()
    changes = shard.fingerprint_changes(manifest["generation"], config.generation_fingerprint())
    if config.data.input and Path(config.data.input).exists():
        new, old = shard.input_fingerprint(config.data.input), manifest["input"]
        if any(new[k] != old.get(k) for k in ("size", "num_rows", "schema", "sha256_head_footer")):
            changes.append("input file")
    if changes and not force:
        raise HpcRolloutError(
            f"{rundir.root} was started with different settings; changed: {', '.join(changes)}; "
            "submit would refuse (use a new run_dir, or --force)"
        )
    return manifest


# ---------------------------------------------------------------------------------------------- CLI
def report(result: dict[str, Any]) -> str:
    """One paragraph saying what a submission did and what to run next."""
    run_dir = result["run_dir"]
    lines = []
    for task, job in sorted(result.get("active", {}).items()):
        lines.append(f"task {task} is already queued or running as job {job}: not resubmitted")
    if not result["tasks"]:
        if result.get("active"):
            lines.append(f"nothing new to submit; follow it with: hpcrollout status {run_dir} --watch")
        else:
            lines.append(
                f"every shard of {run_dir} is done; merge with: hpcrollout merge {run_dir} --output OUT.parquet"
            )
    elif result["executor"] == "slurm":
        lines.append(
            f"submitted array job {result['job_id']}: {len(result['tasks'])} task(s) {_ranges(result['tasks'])}"
        )
        lines.append(f"follow it with: hpcrollout status {run_dir} --watch")
    else:
        failed = {t: c for t, c in result.get("exit_codes", {}).items() if c}
        lines.append(f"ran {len(result['tasks'])} local task(s); {len(failed)} failed")
        if failed:
            lines.append(f"see hpcrollout status {run_dir}; rerun the failed ones with: hpcrollout resume {run_dir}")
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set slurm.partition=gpu (repeatable)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print shards, resources and the sbatch script; submit nothing"
    )
    parser.add_argument(
        "--force", action="store_true", help="reopen a run directory despite changed generation settings"
    )


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(config, force=args.force))
        return 0
    result = submit_run(config, force=args.force)
    print(report(result))
    return 1 if any(result.get("exit_codes", {}).values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
