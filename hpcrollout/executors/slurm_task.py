"""The callable each SLURM array task runs: checkpointable (requeue on timeout/preemption) and self-retrying.

submitit pickles one ``SlurmTask`` per array task and calls it on the node. The object holds only the run
directory; everything else (config, shards, progress) is read from the run directory, so a requeued or
resubmitted task picks up where the last attempt committed.

Per task, ``RUN_DIR/tasks/00003.json`` records the SLURM job id of the current submission, attempts, failures,
requeues, the last error and the log files; ``hpcrollout status`` reads it together with sacct/squeue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from hpcrollout.errors import HpcRolloutError
from hpcrollout.procs import slurm_job_id
from hpcrollout.rundir import RunDir, read_record, write_json_atomic

log = logging.getLogger("hpcrollout")

def read_task_record(run_dir: RunDir, task_id: int) -> dict[str, Any]:
    """The task's record, or {} if it never started (or the file is unreadable)."""
    return read_record(run_dir.task_record(task_id))


def _setup_logging() -> None:
    """Log lines (not progress bars) to stderr, which submitit writes to the task's .err file."""
    logger = logging.getLogger("hpcrollout")
    if not any(getattr(h, "_hpcr_task", False) for h in logger.handlers):
        from hpcrollout.cli import StderrHandler

        handler = StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s hpcrollout: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
        handler._hpcr_task = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class SlurmTask(submitit.helpers.Checkpointable):
    """``SlurmTask(run_dir)(task_id)`` processes one array task's pending shards of the run."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)
        self._requeued = False

    # -- the task ---------------------------------------------------------------------------------------------
    def __call__(self, task_id: int) -> dict[str, Any]:
        # Under SLURM, log lines rather than progress bars (the worker logs throughput periodically).
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from hpcrollout import raycluster

        _setup_logging()
        rank = int(os.environ.get("SLURM_PROCID", "0") or 0)
        if rank != 0:
            # slurm.nodes > 1: srun starts this on every node; rank 0 starts the Ray cluster over all of them
            # (raycluster.py: its own srun puts a Ray worker on each other node) and its engine drives them.
            log.info("task %d: rank %d of a multi-node task stays idle; rank 0 runs the shards", task_id, rank)
            return {"task": task_id, "rank": rank, "idle": True}
        self._requeued = False  # a requeued attempt is unpickled with the flag its predecessor set
        rundir = RunDir(self.run_dir)
        record = self._start(rundir, task_id)
        previous = signal.getsignal(signal.SIGTERM)

        self._terminated = False

        def on_sigterm(signum: int, frame: Any) -> None:
            # scancel, node shutdown or preemption: keep what has finished and start nothing new; SLURM kills
            # us after KillWait, or (submitit's preemption) a checkpoint signal follows and requeues the task.
            log.warning("task %d: SIGTERM, committing finished results and stopping", task_id)
            self._terminated = True
            self._flush()
            raycluster.stop_current()  # slurm.nodes > 1: the Ray cluster goes with the engine
            if not self._requeued:  # our own retry requeue also sends SIGTERM: keep its "retrying" record
                self._update(rundir, task_id, state="terminated")
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            with raycluster.ray_cluster(rundir.load_config(), rundir.root, task_id):  # slurm.nodes > 1 only
                result = self._run_shards(task_id)
            if self._terminated:
                self._wait_for_end(task_id)
        except UncompletedJobError as exc:
            # submitit gave up requeueing (slurm.max_requeues timeouts/preemptions): a retry would defeat the limit.
            requeues = max(0, int(read_task_record(rundir, task_id).get("requeues", 1)) - 1)  # this one was not
            self._update(rundir, task_id, state="failed", error=f"{exc} (slurm.max_requeues)", requeues=requeues)
            raise
        except HpcRolloutError as exc:
            # A user error (bad model path, bad shard) fails the same way every time: no retry.
            self._update(
                rundir, task_id, state="failed", error=f"HpcRolloutError: {exc}", failures=record["failures"] + 1
            )
            raise
        except Exception as exc:
            failures = record["failures"] + 1
            tb = traceback.format_exc()
            retries = rundir.load_config().slurm.max_retries
            if failures <= retries and self._requeue_self(rundir, task_id, failures, exc, tb, retries):
                sys.exit(1)  # SystemExit passes submitit's handler: no result pickle, the requeued attempt runs
            self._update(
                rundir,
                task_id,
                state="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=tb[-4000:],
                failures=failures,
            )
            log.error("task %d failed %d time(s), not retried again (slurm.max_retries=%d)", task_id, failures, retries)
            raise
        self._update(rundir, task_id, state="done", finished=time.time())
        return result

    # -- submitit hooks ------------------------------------------------------------------------------------
    def checkpoint(self, task_id: int) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the pre-timeout/preemption signal: commit finished work, then requeue as is."""
        log.warning("task %d: checkpoint signal, committing finished results before requeue", task_id)
        self._requeued = True  # the SIGTERM that follows the requeue must not overwrite the record
        self._flush()
        from hpcrollout import raycluster

        raycluster.stop_current()  # the requeued attempt builds a fresh cluster
        rundir = RunDir(self.run_dir)
        record = read_task_record(rundir, task_id)
        self._update(rundir, task_id, state="requeued", requeues=int(record.get("requeues", 0)) + 1)
        return submitit.helpers.DelayedSubmission(self, task_id)

    # -- helpers -------------------------------------------------------------------------------------------
    def _run_shards(self, task_id: int) -> dict[str, Any]:
        """The task's work: its shards through the engine (tests put a stand-in engine here)."""
        from hpcrollout import worker

        return worker.run_task(self.run_dir, task_id, should_stop=lambda: self._terminated)

    @staticmethod
    def _wait_for_end(task_id: int, limit_s: float = 300.0) -> None:
        """Stopped by SIGTERM: wait for SLURM's kill, or for the checkpoint signal whose handler requeues and exits."""
        log.warning("task %d stopped after SIGTERM; waiting for the job to end", task_id)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
        raise RuntimeError(
            f"task {task_id} was sent SIGTERM and stopped, but its job did not end within {limit_s:.0f}s"
        )

    @staticmethod
    def _flush() -> None:
        try:
            from hpcrollout import worker

            worker.flush_now()
        except Exception:  # a failed flush must not stop the requeue: committed parts are still intact
            log.exception("flush before requeue failed; the task resumes from its last commit")

    @staticmethod
    def _start(rundir: RunDir, task_id: int) -> dict[str, Any]:
        job_id = slurm_job_id()
        record = read_task_record(rundir, task_id)
        if record.get("job_id") != job_id:  # a new submission (resume) starts with a clean failure count
            record = {"task": task_id, "job_id": job_id, "failures": 0, "requeues": 0, "retries": 0, "attempts": 0}
        record.update(
            state="running",
            attempts=int(record.get("attempts", 0)) + 1,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.time(),
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        )
        try:
            paths = submitit.JobEnvironment().paths
            record.update(stdout=str(paths.stdout), stderr=str(paths.stderr))
        except Exception:  # not started by submitit (a direct call): no submitit logs to point to
            pass
        record["time"] = time.time()
        write_json_atomic(rundir.task_record(task_id), record)
        log.info("task %d (job %s) attempt %d on %s", task_id, job_id, record["attempts"], record["host"])
        return record

    @staticmethod
    def _update(rundir: RunDir, task_id: int, **fields: Any) -> None:
        try:
            record = read_task_record(rundir, task_id)
            record.update(fields, time=time.time())
            write_json_atomic(rundir.task_record(task_id), record)
        except OSError:
            log.exception("could not update the task record of task %d", task_id)

    def _requeue_self(self, rundir: RunDir, task_id: int, failures: int, exc: Exception, tb: str, retries: int) -> bool:
        job_id = slurm_job_id()
        if not job_id:
            return False
        log.error("task %d raised (%s: %s); retry %d of %d", task_id, type(exc).__name__, exc, failures, retries)
        sys.stderr.write(tb)
        retried = int(read_task_record(rundir, task_id).get("retries", 0)) + 1
        self._update(
            rundir,
            task_id,
            state="retrying",
            retries=retried,
            error=f"{type(exc).__name__}: {exc}",
            traceback=tb[-4000:],
            failures=failures,
        )
        self._requeued = True
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as err:
            log.error("scontrol requeue %s failed (%s); the task is reported failed", job_id, err)
            self._update(rundir, task_id, retries=retried - 1)
            self._requeued = False
            return False
        return True
