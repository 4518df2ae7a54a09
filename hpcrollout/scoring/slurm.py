"""Score a run directory's shards as a SLURM CPU array: one array task per finished shard not yet scored.

``hpcrollout score RUN_DIR --slurm`` submits the array through submitit (``map_array``), with the run's own
``slurm:`` settings (partition, account, qos, setup lines, ...) but no GPUs, ``--slurm_cpus`` CPUs and
``--slurm_time_min`` minutes per task. Each task runs the same unit as ``hpcrollout score RUN_DIR --shards N``:
it writes ``scores/N.parquet`` atomically, with one verifier worker per CPU SLURM gave it. A task that dies
leaves no score file, so submitting again (or scoring locally) redoes only the shards without one. The array's
logs are under ``RUN_DIR/logs/score/``; it is not recorded in ``jobs.json``, which is the generation's.
With ``--wait`` the command waits for the array, then assembles ``--output`` from the score files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir
from hpcrollout.scoring.score import Settings, build_spec, score_run_dir, shard_is_scored

log = logging.getLogger("hpcrollout")


class ScoreShardTask:
    """``ScoreShardTask(run_dir, settings)(shard)``: score one finished shard (what each array task runs)."""

    def __init__(self, run_dir: str | Path, settings: Settings, rescore: bool = False) -> None:
        self.run_dir = str(run_dir)
        self.settings = dataclasses.replace(settings, workers=None)  # None: SLURM_CPUS_PER_TASK workers
        self.rescore = rescore

    def __call__(self, shard: int) -> dict[str, Any]:
        os.environ.setdefault("TQDM_DISABLE", "1")
        if not logging.getLogger("hpcrollout").handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("hpcrollout").setLevel(logging.INFO)
        report = score_run_dir(self.run_dir, None, self.settings, shards=str(shard), rescore=self.rescore)
        log.info("scored shard %05d: %d responses, %s", shard, report.responses, report.statuses)
        return dataclasses.asdict(report)


def shards_to_score(rd: RunDir, settings: Settings, rescore: bool) -> list[int]:
    """Finished shards without a score file made with these settings (all finished shards with ``rescore``)."""
    from hpcrollout.merge import merged_schema

    done = sorted(s for s in rd.done_shards() if rd.shard_output(s).exists())
    if not done:
        raise HpcRolloutError(f"{rd.root}: no shard is finished yet; nothing to score")
    spec, _ = build_spec(settings, merged_schema(rd, done), rd.root)  # the user's errors here, not in every task
    fingerprint = settings.fingerprint(spec.reference)
    return [s for s in done if rescore or not shard_is_scored(rd, s, fingerprint)]


def submit_scoring(
    run_dir: str | Path,
    settings: Settings,
    *,
    cpus: int | None = None,
    time_min: int = 60,
    partition: str | None = None,
    mem_gb: float | None = None,
    rescore: bool = False,
) -> tuple[list[int], list[Any]]:
    """Submit one array task per shard to score; returns (shards, submitit jobs)."""
    import submitit

    from hpcrollout.executors.slurm import slurm_parameters

    rd = RunDir(run_dir)
    rd.require()
    todo = shards_to_score(rd, settings, rescore)
    if not todo:
        return [], []
    config = rd.load_config()
    params = slurm_parameters(config)
    params.pop("gres", None)  # scoring needs CPUs only
    params.pop("exclusive", None)
    params.update(
        job_name=f"{config.slurm.job_name}-score", time=time_min, cpus_per_task=cpus or config.slurm.cpus_per_task
    )
    params["nodes"] = 1
    if partition:
        params["partition"] = partition
    if mem_gb:
        params["mem"] = f"{int(mem_gb * 1024)}MB"
    try:
        executor = submitit.SlurmExecutor(folder=rd.score_logs_dir.resolve() / "%j", max_num_timeout=0)
    except RuntimeError as exc:  # no srun on PATH
        raise HpcRolloutError(
            f"--slurm needs a SLURM client on this machine ({exc}); submit from a login node, or score here "
            f"without --slurm (or per shard: hpcrollout score {rd.root} --shards N)"
        ) from None
    try:
        executor.update_parameters(**params)
    except ValueError as exc:
        raise HpcRolloutError(f"slurm: invalid sbatch parameters for the scoring array: {exc}") from None
    jobs = executor.map_array(ScoreShardTask(rd.root.resolve(), settings, rescore), todo)
    log.info("submitted scoring array %s: %d task(s) for shards %s", jobs[0].job_id.split("_")[0], len(jobs), todo)
    return todo, jobs


def wait_for(jobs: list[Any], rd: RunDir) -> None:
    """Wait for every array task; a failed one is an error naming its shard's log."""
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - reported together below
            failed.append(f"{job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
    if failed:
        raise HpcRolloutError(
            f"{len(failed)} scoring task(s) failed ({'; '.join(failed[:3])}); logs under {rd.score_logs_dir}. "
            f"Submit again to redo only the shards without a score file: hpcrollout score {rd.root} --slurm ..."
        )
