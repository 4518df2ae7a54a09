"""The one interface every executor implements: launch a run's tasks, and say which are queued or running.

An executor is a module of ``hpcrollout/executors/`` with one ``Executor`` subclass: ``local`` (processes on
this machine) and ``slurm`` (a submitit job array) today; LSF, PBS or Kubernetes jobs would each be one more.
What a task runs is the same everywhere (``worker.run_task``: one engine, or ``engines_per_task`` of them,
executors/engine_group.py), and everything a task knows is in the run directory, so executors differ only in
how tasks start and how the scheduler is asked about them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig
    from hpcrollout.rundir import RunDir


class Executor(ABC):
    """Launches tasks of a run directory and reports the active ones."""

    name: str

    @abstractmethod
    def active_tasks(self, rundir: RunDir) -> dict[int, str]:
        """Tasks of this run queued or running now, {task: what runs it (job id, pid)}."""

    @abstractmethod
    def reserve(self, rundir: RunDir, tasks: list[int]) -> None:
        """Under the run directory's lock: mark these tasks taken, so a concurrent submit does not start them."""

    @abstractmethod
    def submit(self, rundir: RunDir, config: RunConfig, tasks: list[int], command: str) -> dict[str, Any]:
        """Launch the tasks (under the run directory's lock) and record the submission in jobs.json; returns what
        the caller reports (slurm: job_id)."""

    def wait(self, rundir: RunDir, config: RunConfig, tasks: list[int]) -> dict[str, Any]:
        """After the lock is released: run what submit only prepared (local tasks run here); returns more to
        report (local: exit_codes). Scheduler executors return at once."""
        return {}

    def release(self) -> None:
        """Give up what reserve took, when the submission failed before its tasks started."""


def get_executor(kind: str) -> Executor:
    """The executor of executor.type."""
    if kind == "slurm":
        from hpcrollout.executors.slurm import SlurmExecutor

        return SlurmExecutor()
    if kind == "local":
        from hpcrollout.executors.local import LocalExecutor

        return LocalExecutor()
    from hpcrollout.errors import HpcRolloutError

    raise HpcRolloutError(f"executor.type: unknown executor {kind!r} (local or slurm)")
