"""Generation backends behind one interface (engines/base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcrollout.engines.base import Engine, PromptRequest, PromptResult, Sample, prompt_seed
from hpcrollout.errors import HpcRolloutError

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

__all__ = [
    "Engine",
    "PromptRequest",
    "PromptResult",
    "Sample",
    "prompt_seed",
    "create_engine",
    "allocated_gpus",
    "tensor_parallel_size",
]


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


def create_engine(config: RunConfig) -> Engine:
    """The configured backend. vLLM is imported only here, only when asked for."""
    if config.backend == "transformers":
        from hpcrollout.engines.transformers_engine import TransformersEngine

        return TransformersEngine(config)
    if config.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise HpcRolloutError(
                f"backend 'vllm' needs vLLM, which is not installed here ({exc}); install it with "
                "pip install 'hpcrollout[vllm]', or run on CPU with --backend transformers "
                "(config: backend: transformers)"
            ) from None
        from hpcrollout.engines.vllm_engine import VllmEngine

        return VllmEngine(config)
    raise HpcRolloutError(f"backend: unknown backend {config.backend!r}")
