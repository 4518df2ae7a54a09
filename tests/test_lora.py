"""LoRA adapters (model.lora, data.lora_column) on the transformers backend with peft: random adapters for the
tiny model change the samples, each row gets its own, an unreadable adapter fails its rows only, and the
adapter is recorded per row; fingerprinted. The vLLM side is in test_vllm_admission.py, against its stand-in."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpcrollout.config import build_config
from hpcrollout.engines.base import PromptRequest
from hpcrollout.engines.transformers_engine import TransformersEngine
from hpcrollout.errors import HpcRolloutError
from hpcrollout.flatten import flatten
from hpcrollout.merge import merge_run
from hpcrollout.shard import prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input

pytest.importorskip("peft")


def lora_config(tmp_path: Path, tiny_model: Path, inp: Path, lora: str | None = None, **sections):
    config = make_config(tmp_path, tiny_model, inp, **sections)
    config.model.lora = lora  # make_config's own argument is named model
    return config


GREEDY = {"n": 1, "temperature": 0.0, "max_tokens": 10, "return_token_ids": True}


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from hpcrollout.tinymodel import build_tiny_adapter

    root = tmp_path_factory.mktemp("adapters")
    return (
        str(build_tiny_adapter(tiny_model, root / "a", rank=4, seed=1)),
        str(build_tiny_adapter(tiny_model, root / "b", rank=8, seed=2)),
    )


def greedy_tokens(tmp_path: Path, tiny_model: Path, lora: str | None) -> list[int]:
    inp = write_input(tmp_path / "in.parquet", make_prompts(1))
    engine = TransformersEngine(lora_config(tmp_path, tiny_model, inp, sampling=GREEDY, lora=lora))
    request = PromptRequest(uid="u", row=0, messages=[{"role": "user", "content": "Tell me"}], text=None, seed=1)
    (result,) = engine.generate([request])
    assert result.error is None and result.lora == lora
    return result.samples[0].token_ids


def test_an_adapter_changes_the_samples(tmp_path, tiny_model, adapters):
    base, a, b = (greedy_tokens(tmp_path, tiny_model, lora) for lora in (None, *adapters))
    assert base != a and base != b and a != b


def test_each_row_gets_its_adapter_end_to_end(tmp_path, tiny_model, adapters):
    a, b = adapters
    cells = [a, None, b, str(tmp_path / "nonexistent"), a, None]
    rows = [dict(r, adapter=cell) for r, cell in zip(make_prompts(6), cells, strict=True)]
    inp = write_input(tmp_path / "in.parquet", rows)

    def run(name: str, **sections) -> list[dict]:
        config = lora_config(tmp_path / name, tiny_model, inp, sampling=GREEDY, **sections)
        run_task(prepare_run(config).root, 0)
        merge_run(tmp_path / name / "run", tmp_path / f"{name}.parquet")
        return pq.read_table(tmp_path / f"{name}.parquet").to_pylist()

    mixed = run("mixed", data={"input": str(inp), "lora_column": "adapter"}, lora=b)
    only_a = run("a", lora=a)
    only_b = run("b", lora=b)
    assert [r["lora_adapter"] for r in mixed] == [a, b, b, cells[3], a, b]  # a null cell: model.lora
    assert [r["lora_adapter"] for r in only_a] == [a] * 6
    for row, source in [(0, only_a), (1, only_b), (2, only_b), (4, only_a), (5, only_b)]:
        assert mixed[row]["token_ids"] == source[row]["token_ids"], f"row {row}"
    assert mixed[3]["error"].startswith(f"LoRA adapter {cells[3]}: cannot read")
    assert all(r["error"] is None for i, r in enumerate(mixed) if i != 3)
    base = run("base", data={"input": str(inp), "lora_column": "adapter"})  # null cells: the base model
    assert [r["lora_adapter"] for r in base] == [a, None, b, cells[3], a, None]
    plain = run("plain")  # no adapter anywhere: the rows between adapters ran with the adapters disabled
    assert (
        [base[i]["token_ids"] for i in (1, 5)]
        == [plain[i]["token_ids"] for i in (1, 5)]
        != [mixed[i]["token_ids"] for i in (1, 5)]
    )
    assert "lora_adapter" not in plain[0]
    flatten(tmp_path / "mixed.parquet", tmp_path / "flat.parquet")
    assert pq.read_table(tmp_path / "flat.parquet").column("lora_adapter").to_pylist() == [a, b, b, cells[3], a, b]


def test_an_unreadable_run_adapter_fails_at_load(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(1))
    config = lora_config(tmp_path, tiny_model, inp, lora=str(tmp_path))
    with pytest.raises(HpcRolloutError, match=r"^model.lora: LoRA adapter .*adapter_config.json"):
        TransformersEngine(config)


def test_adapters_are_fingerprinted(tmp_path, tiny_model, adapters):
    a, b = adapters
    inp = write_input(tmp_path / "in.parquet", [dict(r, adapter=a) for r in make_prompts(3)])
    prepare_run(lora_config(tmp_path, tiny_model, inp, lora=a))
    with pytest.raises(HpcRolloutError, match=r"model settings[\s\S]*model.lora: "):
        prepare_run(lora_config(tmp_path, tiny_model, inp, lora=b), busy=True)
    lora_column = {"input": str(inp), "lora_column": "adapter"}
    with pytest.raises(HpcRolloutError, match=r"data settings[\s\S]*data.lora_column: None -> 'adapter'"):
        prepare_run(lora_config(tmp_path, tiny_model, inp, lora=a, data=lora_column), busy=True)
    # a run directory from before model.lora existed still resumes
    from hpcrollout.config import _digest

    config = build_config({"model": {"path": "m"}})
    old = config.model_dump(mode="json")["model"]
    del old["lora"]
    assert config.generation_fingerprint()["model"] == _digest(old)
