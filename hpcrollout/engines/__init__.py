"""Generation backends behind one interface (engines/base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcrollout.engines.base import Engine, PromptRequest, PromptResult, Sample, prompt_seed
from hpcrollout.errors import HpcRolloutError

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

__all__ = ["Engine", "PromptRequest", "PromptResult", "Sample", "prompt_seed", "create_engine"]


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
