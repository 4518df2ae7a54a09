"""Fixtures of the GPU suite (pytest -m gpu): a small real model built offline, one vLLM engine shared by the tests.

The model is hpcrollout.tinymodel's "small" Qwen3 shape with random (saved, so fixed) weights: real vLLM
kernels, seconds to start. The suite runs in vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1) so that a
prompt's samples are bit-identical whatever else is in the batch: that is what lets the resume tests compare
samples exactly. Set HPCR_GPU_RESULTS=DIR to keep the figures some tests measure (JSON files).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "backend": "vllm",
    "engine": {
        "gpu_memory_utilization": 0.25,
        "max_model_len": 512,
        "max_num_seqs": 64,
        "enforce_eager": True,
    },
    "sampling": {"n": 4, "max_tokens": 16, "temperature": 1.0, "ignore_eos": True, "seed": 1234},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="session")
def gpu_env() -> dict[str, str]:
    """Skip without vLLM or a GPU; otherwise the environment the suite (and its subprocesses) run with."""
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    return dict(os.environ)


@pytest.fixture(scope="session")
def gpu_model(gpu_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcrollout.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "small", shape="small")


@pytest.fixture(scope="session")
def make_config(gpu_model: Path) -> Callable[..., Any]:
    """make_config(overrides dict) -> RunConfig for the small model, the suite's engine settings merged in."""
    from hpcrollout.config import build_config

    def make(over: dict[str, Any] | None = None) -> Any:
        tree = _merge(_merge(BASE, {"model": {"path": str(gpu_model)}}), over or {})
        return build_config(tree, "gpu test config")

    return make


@pytest.fixture(scope="session")
def shared_llm(make_config: Callable[..., Any]) -> Iterator[Any]:
    """One started vllm.LLM for the whole suite (wrapped in VllmEngine instances per sampling config)."""
    from hpcrollout.engines.vllm_engine import VllmEngine

    engine = VllmEngine(make_config())
    yield engine
    engine.close()


@pytest.fixture
def engine_for(shared_llm: Any, make_config: Callable[..., Any]) -> Callable[..., Any]:
    """engine_for(overrides) -> a VllmEngine over the shared LLM with that config's sampling and template."""
    from hpcrollout.engines.vllm_engine import VllmEngine

    def make(over: dict[str, Any] | None = None) -> Any:
        engine = VllmEngine(make_config(over), llm=shared_llm.llm)
        engine.engine_start_s = shared_llm.engine_start_s
        return engine

    return make


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("HPCR_GPU_RESULTS")
    path = Path(where) if where else tmp_path_factory.mktemp("gpu-results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def python() -> str:
    return sys.executable
