"""LoRA adapters: one for the run (``model.lora``) or one per row (``data.lora_column``), in PEFT's format.

An adapter is a directory with ``adapter_config.json`` (its rank ``r``) and the weights, as
``peft.PeftModel.save_pretrained`` writes it. A row's adapter is its ``data.lora_column`` cell, else
``model.lora``, else none (the base model); the worker resolves it into ``PromptRequest.lora`` and the output
records it per row (``lora_adapter``). The vLLM backend starts with ``enable_lora``, ``max_lora_rank`` (the
smallest rank vLLM supports that holds every adapter found: ``model.lora`` and the distinct cells of the
column in the run's shards) and ``max_loras`` set, unless ``engine.kwargs`` sets them; each adapter gets one
``LoRARequest`` id for the engine's life. The transformers backend loads each adapter with ``peft`` on its
first row. An adapter that cannot be read fails its rows (error records naming the path), not the run; a
``model.lora`` that cannot be read fails at engine start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from hpcrollout.errors import HpcRolloutError

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks (0.26)
_MAX_LORAS = 8  # adapters vLLM batches at once by default here; more run in turns (engine.kwargs.max_loras)


def uses_lora(config: RunConfig) -> bool:
    return config.model.lora is not None or config.data.lora_column is not None


def adapter_rank(path: str) -> int:
    """The rank ``r`` in an adapter's adapter_config.json; ValueError says why it cannot be read."""
    config = Path(path) / "adapter_config.json"
    try:
        rank = json.loads(config.read_text()).get("r")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"LoRA adapter {path}: cannot read {config} ({exc}); give a PEFT adapter directory") from None
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA adapter {path}: {config} has no rank r (got {rank!r})")
    return rank


def run_adapters(config: RunConfig) -> list[str]:
    """model.lora and the distinct adapters of data.lora_column in the run's shards, in first-seen order."""
    found = [config.model.lora] if config.model.lora else []
    column = config.data.lora_column
    if column and config.run_dir:
        from hpcrollout.rundir import RunDir

        rundir = RunDir(config.run_dir)
        for shard in range(rundir.num_shards()):
            values = pq.read_table(rundir.shard_input(shard), columns=[column]).column(column).unique().to_pylist()
            found += [v for v in values if isinstance(v, str) and v]
    return list(dict.fromkeys(found))


def vllm_lora_kwargs(config: RunConfig) -> dict[str, Any]:
    """enable_lora, max_lora_rank and max_loras for vllm.LLM from the adapters found (see the docstring)."""
    if not uses_lora(config):
        return {}
    if config.model.lora:
        try:
            adapter_rank(config.model.lora)
        except ValueError as exc:
            raise HpcRolloutError(f"model.lora: {exc}") from None
    adapters = run_adapters(config)
    ranks = []
    for path in adapters:
        try:
            ranks.append(adapter_rank(path))
        except ValueError:
            continue  # that adapter's rows become error records when they are submitted
    rank = max(ranks, default=16)
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise HpcRolloutError(f"LoRA adapters of rank {rank}: vLLM takes at most rank {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": max(1, min(len(ranks), _MAX_LORAS))}
