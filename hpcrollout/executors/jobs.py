"""The jobs registry, RUN_DIR/jobs.json: every submission of a run, whichever executor made it.

``submit`` appends one entry per submission (under the run directory's lock); ``status`` and ``submit`` read
it to know each task's scheduler job. Entries are written whole (atomic replace) and only ever appended.
"""

from __future__ import annotations

from typing import Any, TypedDict

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir, read_json, write_json_atomic


class Submission(TypedDict, total=False):
    """One entry of jobs.json."""

    executor: str  # local | slurm
    command: str  # submit | resume
    tasks: list[int]  # task ids, in array order
    time: float
    num_tasks: int
    job_id: str  # slurm: the array job id
    job_ids: list[str]  # slurm: ARRAY_INDEX per task, or a plain id for a single task
    host: str
    folder: str


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_jobs(rundir: RunDir) -> dict[str, Any]:
    """RUN_DIR/jobs.json: {"submissions": [Submission, ...]}; empty if absent, a clear error if damaged."""
    path = rundir.jobs_path
    next_step = (
        f"move it aside (mv {path} {path}.bad) and check with squeue that no job of this run is still queued "
        "or running; then submit or resume again (status then knows only the jobs submitted after that)"
    )
    try:
        jobs = read_json(path, next_step)
    except FileNotFoundError:
        return {"submissions": []}
    subs = jobs.setdefault("submissions", []) if isinstance(jobs, dict) else None
    if not isinstance(subs, list) or not all(
        isinstance(sub, dict)
        and isinstance(sub.get("tasks", []), list)
        and all(_int(t) is not None for t in sub.get("tasks", []))
        for sub in subs
    ):
        raise HpcRolloutError(f'{path} is not a record of submissions ({{"submissions": [...]}}); {next_step}')
    return jobs


def record_submission(rundir: RunDir, entry: Submission) -> None:
    """Append one submission to RUN_DIR/jobs.json (atomically; callers hold the run directory's lock)."""
    jobs = read_jobs(rundir)
    jobs["submissions"].append(entry)
    write_json_atomic(rundir.jobs_path, jobs)


def submission_jobs(sub: dict[str, Any]) -> list[tuple[int, str]]:
    """(task, SLURM job id) pairs of one submission: ARRAY_INDEX, or a plain id when one task was submitted."""
    if sub.get("executor") != "slurm" or not sub.get("job_id"):
        return []
    ids = sub.get("job_ids") or [f"{sub['job_id']}_{i}" for i in range(len(sub["tasks"]))]
    return [(int(task), str(job)) for task, job in zip(sub["tasks"], ids)]


def latest_jobs(rundir: RunDir, jobs: dict[str, Any] | None = None) -> dict[int, str]:
    """Each task's SLURM job id (ARRAY_INDEX) in its latest submission."""
    out: dict[int, str] = {}
    for sub in (jobs or read_jobs(rundir))["submissions"]:
        out.update(submission_jobs(sub))
    return out


def task_of_job(rundir: RunDir, jobs: dict[str, Any] | None = None) -> dict[str, int]:
    """Every SLURM job id this run ever submitted -> its task."""
    return {job: task for sub in (jobs or read_jobs(rundir))["submissions"] for task, job in submission_jobs(sub)}
