"""Launch a run's array: prepare (or reopen) the run directory, then submit the unfinished tasks.

`python -m hpcrollout.submit --config big.yaml` (or `hpcrollout submit`). With executor.type slurm this is one
submitit job array (`map_array`) of checkpointable tasks; with executor.type local the tasks run here.
The executor (executors/: local or slurm) launches the tasks. Submitting again with the same config, or
`hpcrollout resume RUN_DIR`, submits only tasks that still have
shards without a completion marker and are not queued or running already. Every submission is recorded in
RUN_DIR/jobs.json, which `hpcrollout status` uses to ask sacct/squeue about the tasks.

In dynamic mode (sharding.mode: dynamic) task ids are labels: tasks claim shards, so a submission tops the queued
and running tasks up to executor.num_tasks (never more tasks than unfinished shards), giving new tasks the lowest
ids not queued or running. `resume RUN_DIR --set executor.num_tasks=8` (or `--add-tasks 4`) while tasks 0-3
run submits tasks 4-7, which join by claiming. In static mode a task owns shards s % num_tasks, so changing
num_tasks while tasks of the old layout are queued or running is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from hpcrollout.config import RunConfig, add_override_arg, check_paths, load_config
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.base import Executor, get_executor
from hpcrollout.executors.jobs import read_jobs
from hpcrollout.executors.slurm import sbatch_script, slurm_parameters
from hpcrollout.rundir import RunDir, static_task
from hpcrollout.status import id_ranges

log = logging.getLogger("hpcrollout")


# ---------------------------------------------------------------------------------------------- which tasks
def is_dynamic(rundir: RunDir, config: RunConfig) -> bool:
    """Tasks claim shards: the run was sharded for dynamic mode and its config still says so."""
    return rundir.manifest().get("mode") == "dynamic" and config.sharding.mode == "dynamic"


def dynamic_task_ids(num_tasks: int, pending: int, active: dict[int, str] | set[int]) -> list[int]:
    """Dynamic mode: ids of the tasks to add so that num_tasks are queued or running (at most one per pending
    shard); ids are labels, the lowest not queued or running (tasks 0-3 running, num_tasks 8: tasks 4-7)."""
    ids: list[int] = []
    want = min(num_tasks, pending) - len(active)
    task = 0
    while len(ids) < want:
        if task not in active:
            ids.append(task)
        task += 1
    return ids


def tasks_with_pending_shards(rundir: RunDir, active: dict[int, str] | None = None) -> list[int]:
    """Tasks to submit: static, those owning a shard without a marker (shard s belongs to task s % num_tasks)
    and not active; dynamic, new labels topping the active tasks up to num_tasks (dynamic_task_ids)."""
    manifest = rundir.manifest()
    active = active or {}
    num_tasks = int(manifest["num_tasks"])
    done = rundir.done_shards()
    pending = [s["shard"] for s in manifest["shards"] if s["shard"] not in done]
    return tasks_for(pending, num_tasks, active, manifest.get("mode") == "dynamic")


def tasks_for(pending: list[int], num_tasks: int, active: dict[int, str], dynamic: bool) -> list[int]:
    """The task ids to submit for these pending shards, leaving out the active (queued or running) tasks."""
    if dynamic:
        return dynamic_task_ids(num_tasks, len(pending), active)
    return sorted({static_task(s, num_tasks) for s in pending} - set(active))


def _check_task_layout(rundir: RunDir, active: dict[int, str], now: int) -> None:
    """Static mode: refuse to change the number of tasks (to now) while tasks of the old layout still run:
    they would share shards. Checked before the run directory is reopened, so the manifest keeps its layout."""
    jobs = read_jobs(rundir)
    if not active or not jobs["submissions"]:
        return
    last = jobs["submissions"][-1].get("num_tasks")
    if last is not None and last != now:
        raise HpcRolloutError(
            f"executor.num_tasks changed from {last} to {now} while tasks of {rundir.root} are still queued or "
            f"running (jobs {', '.join(sorted(set(active.values())))}); wait for them or scancel them, then submit again"
        )


# ---------------------------------------------------------------------------------------------- submit
def preflight(config: RunConfig) -> None:
    """What must hold before a run directory is created: the demo's model and input built (demo: true), the
    model, tokenizer and chat template paths present."""
    from hpcrollout.demo import ensure_demo_inputs

    ensure_demo_inputs(config)
    check_paths(config)


def add_tasks_to(config: RunConfig, rundir: RunDir, add_tasks: int, active: dict[int, str]) -> None:
    """--add-tasks N: N more tasks than are queued or running now (dynamic mode, SLURM) become executor.num_tasks."""
    if add_tasks < 1:
        raise HpcRolloutError(f"--add-tasks must be at least 1, got {add_tasks}")
    if not rundir.exists():
        raise HpcRolloutError(
            f"--add-tasks adds tasks to an existing run, but {rundir.root} has no run yet; submit it first"
        )
    if config.executor.type != "slurm":
        raise HpcRolloutError(
            "--add-tasks needs executor.type slurm (local tasks run inside the submitting command; start another "
            f"worker beside them: python -m hpcrollout.worker {rundir.root} --task N)"
        )
    if not is_dynamic(rundir, config):
        raise HpcRolloutError(
            f"--add-tasks needs sharding.mode dynamic, but {rundir.root} is static (task i owns shards i, i+N, ...); "
            "change executor.num_tasks once no task of the run is queued or running"
        )
    config.executor.num_tasks = len(active) + add_tasks


def submit_run(
    config: RunConfig,
    *,
    force: bool = False,
    command: str = "submit",
    tasks: list[int] | None = None,
    add_tasks: int | None = None,
) -> dict[str, Any]:
    """Prepare or reopen the run directory and launch its unfinished tasks; returns what was submitted.

    add_tasks (dynamic mode): submit that many tasks beside the queued and running ones, which they join.
    """
    from hpcrollout.shard import prepare_run

    config.require("run_dir", "data.input", "model.path")
    preflight(config)
    rundir = RunDir(config.run_dir)
    executor = get_executor(config.executor.type)
    # a failure before the tasks start frees what the executor took for them
    with rundir.lock(command), _released_on_error(executor):
        active = running_tasks(rundir, config)
        if add_tasks is not None:
            add_tasks_to(config, rundir, add_tasks, active)
        if active and not is_dynamic(rundir, config):
            _check_task_layout(rundir, active, config.executor.num_tasks)
        rundir = prepare_run(config, force=force, busy=bool(active))
        wanted = tasks_with_pending_shards(rundir, active)
        if tasks is not None:
            wanted = [t for t in wanted if t in set(tasks)]
        result: dict[str, Any] = {
            "run_dir": str(rundir.root),
            "executor": config.executor.type,
            "mode": rundir.manifest().get("mode", "static"),
            "tasks": [],
            "active": active,
        }
        if not wanted:
            return result
        result["tasks"] = wanted
        executor.reserve(rundir, wanted)
        result.update(executor.submit(rundir, config, wanted, command))
    result.update(executor.wait(rundir, config, wanted))  # local tasks run here, after the lock
    return result


@contextlib.contextmanager
def _released_on_error(executor: Executor) -> Iterator[None]:
    try:
        yield
    except BaseException:
        executor.release()
        raise


def running_tasks(rundir: RunDir, config: RunConfig) -> dict[int, str]:
    """Tasks of this run queued or running now, {task: job}: SLURM's from squeue, local ones from their locks."""
    if not rundir.exists():
        return {}
    return get_executor(config.executor.type).active_tasks(rundir)


# ---------------------------------------------------------------------------------------------- dry run
def dry_run(config: RunConfig, *, force: bool = False, out=None, add_tasks: int | None = None) -> str:
    """What submit would do, as text: shards, tasks, resources and the sbatch script. Writes nothing."""
    config.require("run_dir", "data.input", "model.path")
    preflight(config)  # demo: true builds the demo's model and input (outside the run directory)
    config = config.model_copy(deep=True)  # --add-tasks sets executor.num_tasks: not on the caller's config
    rundir = RunDir(config.run_dir)
    lines = ["dry run: nothing is written or submitted"]
    active = running_tasks(rundir, config)
    if add_tasks is not None:
        add_tasks_to(config, rundir, add_tasks, active)
    num_tasks = config.executor.num_tasks
    if rundir.exists():
        manifest = _reopen_check(rundir, config, force, busy=bool(active))
        dynamic = is_dynamic(rundir, config)
        if active and not dynamic:
            _check_task_layout(rundir, active, num_tasks)
        shards, done = manifest["shards"], rundir.done_shards()
        lines.append(f"run dir: {rundir.root} (exists: {len(done)} of {len(shards)} shards done)")
    else:
        dynamic = config.sharding.mode == "dynamic"
        shards, done = _plan_shards(config), set()
        lines.append(f"run dir: {rundir.root} (new: would be created and sharded)")
    pending = [s for s in shards if s["shard"] not in done]
    tasks = tasks_for([s["shard"] for s in pending], num_tasks, active, dynamic)
    total = sum(s["rows"][1] - s["rows"][0] for s in shards)
    lines.append(
        f"input: {config.data.input} ({total} prompts x n={config.sampling.n}); model: {config.model.path}; backend: {config.backend}"
    )
    busy = [s for s in pending if not dynamic and static_task(s["shard"], num_tasks) in active]
    counts = f"{len(pending) - len(busy)} to run" + (f", {len(busy)} queued or running" if busy else "")
    lines.append(f"shards: {len(shards)} ({counts}), tasks: {num_tasks} ({config.sharding.mode})")
    lines.append(f"  {'shard':>5} {'rows':>17} {'prompts':>8} {'est_work':>10} {'task':>5} state")
    for s in shards:
        a, b = s["rows"]
        task = static_task(s["shard"], num_tasks) if not dynamic else "-"
        if s["shard"] in done:
            state = "done"
        elif not dynamic and task in active:  # its task is queued or running: not submitted again
            state = f"queued or running (job {active[task]})"
        else:
            state = "to run"
        lines.append(f"  {s['shard']:>5} {f'{a}-{b}':>17} {b - a:>8} {s.get('est_work', 0):>10.0f} {task:>5} {state}")
    lines += active_lines(active, "would not be resubmitted")
    if dynamic and active and tasks:
        lines.append(f"dynamic mode: the new tasks join the {len(active)} queued or running one(s) by claiming shards")
    if not tasks:
        lines.append("nothing to submit" + ("" if active else ": every shard is done"))
        return "\n".join(lines)
    lines.append(f"would submit: {len(tasks)} task(s) {id_ranges(tasks)} via executor {config.executor.type}")
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


def _plan_shards(config: RunConfig) -> list[dict[str, Any]]:
    """The shard table prepare_run would write, computed in memory."""
    from hpcrollout import shard

    _, work, ranges = shard.plan_input(config)
    return [{"shard": i, "rows": [a, b], "est_work": float(work[a:b].sum())} for i, (a, b) in enumerate(ranges)]


def _reopen_check(rundir: RunDir, config: RunConfig, force: bool, busy: bool = False) -> dict[str, Any]:
    """The refusal prepare_run would give on reopening, without its writes."""
    from hpcrollout import shard

    manifest = rundir.manifest()
    changes = shard.reopen_changes(rundir, config)
    if changes and not force and (busy or rundir.has_committed_samples()):
        shard.refuse_changes(rundir, config, changes)
    return manifest


# ---------------------------------------------------------------------------------------------- CLI
def active_lines(active: dict[int, str], what: str, limit: int = 8) -> list[str]:
    """The queued or running tasks, one line each, or one line per array job when there are many."""
    if len(active) <= limit:
        return [
            f"task {task} is already queued or running as job {job}: {what}" for task, job in sorted(active.items())
        ]
    arrays: dict[str, list[int]] = {}
    for task, job in sorted(active.items()):
        arrays.setdefault(job.split("_")[0], []).append(task)
    return [
        f"{len(tasks)} tasks {id_ranges(tasks)} are already queued or running in array job {array}: {what}"
        for array, tasks in sorted(arrays.items())
    ]


def report(result: dict[str, Any]) -> str:
    """One paragraph saying what a submission did and what to run next."""
    run_dir = result["run_dir"]
    lines = active_lines(result.get("active", {}), "not resubmitted")
    if not result["tasks"]:
        if result.get("active"):
            lines.append(f"nothing new to submit; follow it with: hpcrollout status {run_dir} --watch")
        else:
            lines.append(
                f"every shard of {run_dir} is done; merge with: hpcrollout merge {run_dir} --output OUT.parquet"
            )
    elif result["executor"] == "slurm":
        lines.append(
            f"submitted array job {result['job_id']}: {len(result['tasks'])} task(s) {id_ranges(result['tasks'])}"
        )
        if result.get("mode") == "dynamic" and result.get("active"):
            lines.append(f"they join the {len(result['active'])} queued or running task(s) by claiming shards")
        lines.append(f"follow it with: hpcrollout status {run_dir} --watch")
    else:
        failed = {t: c for t, c in result.get("exit_codes", {}).items() if c}
        lines.append(f"ran {len(result['tasks'])} local task(s); {len(failed)} failed")
        if failed:
            lines.append(f"see hpcrollout status {run_dir}; rerun the failed ones with: hpcrollout resume {run_dir}")
        else:
            lines.append(f"merge with: hpcrollout merge {run_dir} --output OUT.parquet")
    return "\n".join(lines)


def add_tasks_arg(parser: argparse.ArgumentParser) -> None:
    """--add-tasks, shared by submit and resume."""
    parser.add_argument(
        "--add-tasks",
        type=int,
        default=None,
        metavar="N",
        help="dynamic mode: submit N tasks beside the queued and running ones; they join by claiming shards",
    )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    add_override_arg(parser, "override a config key, e.g. --set slurm.partition=gpu (repeatable)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print shards, resources and the sbatch script; submit nothing"
    )
    parser.add_argument(
        "--force", action="store_true", help="reopen a run directory despite changed generation settings"
    )
    add_tasks_arg(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(config, force=args.force, add_tasks=args.add_tasks))
        return 0
    result = submit_run(config, force=args.force, add_tasks=args.add_tasks)
    print(report(result))
    return 1 if any(result.get("exit_codes", {}).values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
