"""A stand-in for vLLM's multi-node engine (no GPUs here): the SLURM task places one Ray actor per node of its
Ray cluster, as vLLM's Ray executor places one worker per GPU, and records where each ran.

Used by tests/test_slurm_ray.py through ``SlurmTask._run_shards``; everything else (the Ray cluster, SIGTERM,
requeue, the task record) is the real SlurmTask.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from hpcrollout import raycluster
from hpcrollout.executors.slurm_task import SlurmTask
from hpcrollout.rundir import write_json_atomic


def placements_path(run_dir: str | Path, attempt: int) -> Path:
    return Path(run_dir) / "standin" / f"attempt-{attempt}.json"


class StandInTask(SlurmTask):
    """SlurmTask whose work is: one GPU actor per node in a STRICT_SPREAD placement group, then wait to be stopped."""

    def _run_shards(self, task_id: int) -> dict[str, Any]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        nodes = int(os.environ[raycluster.NODES_VAR])
        gpus = int(os.environ[raycluster.GPUS_VAR])
        on_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init()  # RAY_ADDRESS, as vLLM's ray.init finds the cluster
        try:
            pg = placement_group([{"GPU": gpus, "CPU": 1}] * nodes, strategy="STRICT_SPREAD")
            ray.get(pg.ready(), timeout=120)

            @ray.remote(num_gpus=gpus, num_cpus=1)
            class Probe:
                def where(self) -> dict[str, Any]:
                    return {"host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

            actors = [
                Probe.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                ).remote()
                for i in range(nodes)
            ]
            placed = ray.get([a.where.remote() for a in actors], timeout=120)
            resources = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}
        finally:
            ray.shutdown()
            # vLLM calls ray.init in its engine-core process, which leaves the task's SIGTERM handler alone; here
            # it ran in the task's own process, and Ray replaced the handler (a bare sys.exit, then SIG_DFL).
            signal.signal(signal.SIGTERM, on_sigterm)
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        write_json_atomic(
            placements_path(self.run_dir, attempt),
            {"placed": placed, "resources": resources, "pid": os.getpid(), "address": os.environ.get("RAY_ADDRESS")},
        )
        while not self._terminated:  # the engine generates until SIGTERM, or the checkpoint signal requeues it
            time.sleep(0.1)
        return {"task": task_id, "placed": placed}
