"""Generation backends behind one interface (engines/base.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hpcrollout.engines.base import NOTHING_NOW, Engine, PromptRequest, PromptResult, Sample, prompt_seed
from hpcrollout.errors import HpcRolloutError

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

__all__ = [
    "NOTHING_NOW",
    "Engine",
    "PromptRequest",
    "PromptResult",
    "Sample",
    "prompt_seed",
    "create_engine",
    "allocated_gpus",
    "visible_gpu_ids",
    "tensor_parallel_size",
    "cpu_threads",
    "limit_cpu_threads",
]

# The thread pools of the math libraries torch (and numpy) may use; each reads its variable when it starts.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_USER_THREADS = "HPCROLLOUT_USER_OMP_NUM_THREADS"


# Set by a task that runs several engines (executor.engines_per_task): this engine's share of the task's CPUs.
ENGINE_THREADS_VAR = "HPCROLLOUT_ENGINE_THREADS"


def visible_gpu_ids() -> list[str]:
    """The GPU ids in CUDA_VISIBLE_DEVICES, in order ([] when unset or empty)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ""
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]


def allocated_gpus() -> int:
    """GPUs this process was given: CUDA_VISIBLE_DEVICES (set by SLURM for --gres/--gpus), else SLURM's counts."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def tensor_parallel_size(config: RunConfig) -> int:
    """engine.tensor_parallel_size if set, else (divided by pipeline stages) the GPUs given to the task, else 1."""
    if config.engine.tensor_parallel_size:
        return config.engine.tensor_parallel_size
    return max(1, allocated_gpus() // config.engine.pipeline_parallel_size)


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM's cgroup or taskset left it), else all."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API (macOS)
        return os.cpu_count() or 1


def cpu_threads(config: RunConfig) -> int:
    """Threads for this engine process: its real share of the CPUs, at least 1, never more.

    Under SLURM the share is SLURM_CPUS_PER_TASK (slurm.cpus_per_task), whatever the node has; elsewhere the
    usable CPUs divided by the tasks the local executor runs at once. torch's default (every core in every
    process) oversubscribes as soon as two tasks share a machine: the demo ran 2-8x slower (issue 10). An
    OMP_NUM_THREADS the user set lower still wins.
    """
    import os

    usable = _usable_cpus()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    engine = os.environ.get(ENGINE_THREADS_VAR, "")
    if engine.isdigit() and int(engine) > 0:  # one of the task's engines: its share, set by the task
        share = int(engine)
    elif slurm.isdigit() and int(slurm) > 0:
        share = int(slurm)
    else:
        ex = config.executor
        share = usable // max(1, min(ex.local_parallelism, ex.num_tasks))
    user = os.environ.get(_USER_THREADS, os.environ.get("OMP_NUM_THREADS", ""))
    if user.isdigit() and int(user) > 0:
        share = min(share, int(user))
    return max(1, min(share, usable))


def limit_cpu_threads(config: RunConfig) -> int:
    """Set this process's thread pools to cpu_threads(config), before torch starts them; returns the count.

    The variables are inherited by processes the engine starts (vLLM's engine core); torch, if already imported,
    is told directly.
    """
    import os
    import sys

    threads = cpu_threads(config)
    # the user's own OMP_NUM_THREADS (or none), remembered before ours replaces it: it stays a cap, ours does not
    os.environ.setdefault(_USER_THREADS, os.environ.get("OMP_NUM_THREADS", ""))
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def create_engine(config: RunConfig) -> Engine:
    """The configured backend, with this process's CPU threads limited to its share. vLLM is imported only here,
    only when asked for."""
    from hpcrollout.config import check_paths

    check_paths(config)  # here too: a compute node may not see what the login node saw
    limit_cpu_threads(config)
    if config.backend == "transformers":
        from hpcrollout.engines.transformers_engine import TransformersEngine

        return TransformersEngine(config)
    if config.backend == "vllm":
        importing = time.monotonic()
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise HpcRolloutError(
                f"backend 'vllm' needs vLLM, which is not installed here ({exc}); install it with "
                "pip install 'hpcrollout[vllm]', or run on CPU with --backend transformers "
                "(config: backend: transformers)"
            ) from None
        from hpcrollout.engines.vllm_engine import VllmEngine

        return VllmEngine(config, imported_s=time.monotonic() - importing)  # vLLM's import in import_s
    raise HpcRolloutError(f"backend: unknown backend {config.backend!r}")
