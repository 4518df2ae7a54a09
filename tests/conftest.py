"""Shared fixtures: a real tiny model (built once per session), input files, configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.config import build_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # the SLURM fixtures live beside the tests that need them
    from tests.slurm_fixtures import *  # noqa: F401,F403
except ImportError:
    pass

TOPICS = ["primes", "tides", "bread", "stars", "rivers", "music", "chess", "clouds"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3-architecture model with a ChatML tokenizer (~600 KB)."""
    from hpcrollout.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight LLaVA model (CLIP tower, Llama decoder) with its processor: 16 prompt tokens an image."""
    from hpcrollout.tinymodel import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")


def make_prompts(n: int, extra: bool = True) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, part {i}."}]
        if i % 4 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        row: dict[str, Any] = {"prompt": msgs}
        if extra:
            row.update(qid=f"q{i:04d}", weight=i * 0.5, tags=["a", "b"][: i % 3])
        rows.append(row)
    return rows


def write_input(path: Path, rows: list[dict[str, Any]] | pa.Table) -> Path:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=7)  # small row groups: streaming code paths get exercised
    return path


def make_config(tmp_path: Path, model: Path, input_path: Path, **sections: dict[str, Any]):
    tree: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "backend": "transformers",
        "data": {"input": str(input_path)},
        "model": {"path": str(model)},
        "sampling": {"n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 7},
        "checkpoint": {"every_prompts": 2, "every_seconds": 30},
        "executor": {"type": "local", "num_tasks": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return build_config(tree)
