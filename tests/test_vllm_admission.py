"""The vLLM backend's submission loop on CPU, against a stand-in for vLLM's engine that simulates its KV cache.

The stand-in (FakeLLMEngine) schedules like vLLM's v1 scheduler in the ways that matter here: a waiting
request is admitted when its prompt fits in the free KV cache, every running sequence grows by one token per
step, and when the cache runs out the newest running request is preempted (its blocks freed, its output
recomputed later). The real engine is tested on a GPU (tests/gpu); this checks the admission rules
(engine.kv_budget, longest first) and that every prompt comes back exactly once, which CI can run.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from hpcrollout.config import build_config
from hpcrollout.engines.admission import Admission
from hpcrollout.engines.base import PromptRequest, prompt_seed


# ------------------------------------------------------------------------------------------ a stand-in vLLM
@dataclass
class FakeSamplingParams:
    n: int = 1
    max_tokens: int = 16
    seed: int | None = None
    ignore_eos: bool = False
    output_kind: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **kw: Any) -> None:
        self.n, self.max_tokens, self.seed = kw.pop("n", 1), kw.pop("max_tokens", 16), kw.pop("seed", None)
        self.ignore_eos, self.output_kind = kw.pop("ignore_eos", False), kw.pop("output_kind", None)
        self.extra = kw


@dataclass
class _Seq:
    request_id: str
    index: int
    prompt: list[int]
    max_tokens: int
    generated: int = 0


class FakeLLMEngine:
    """vLLM's scheduling, reduced to KV-cache bookkeeping in tokens (one token per sequence per step)."""

    def __init__(self, capacity: int, max_num_seqs: int = 256, max_model_len: int = 4096) -> None:
        self.capacity, self.max_num_seqs = capacity, max_num_seqs
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len)
        cache = types.SimpleNamespace(num_gpu_blocks=capacity // 16, block_size=16, enable_prefix_caching=False)
        self.vllm_config = types.SimpleNamespace(
            cache_config=cache, scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs)
        )
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.requests: dict[str, dict[str, Any]] = {}
        self.steps = self.preemptions = self.peak_running = 0
        self.added: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, request_id: str, prompt: dict[str, Any], params: FakeSamplingParams) -> None:
        ids = prompt["prompt_token_ids"]
        if 0 in ids:
            raise ValueError("token id 0 is not in the vocabulary")  # how a rejected prompt looks
        self.added.append(request_id)
        self.requests[request_id] = {"prompt": ids, "n": params.n, "done": {}, "seed": params.seed}
        self.waiting += [_Seq(request_id, i, ids, params.max_tokens) for i in range(params.n)]

    def abort_request(self, ids: list[str]) -> None:
        self.aborted += ids
        drop = set(ids)
        self.waiting = [s for s in self.waiting if s.request_id not in drop]
        self.running = [s for s in self.running if s.request_id not in drop]

    def _used(self) -> int:
        return sum(len(s.prompt) + s.generated for s in self.running)

    def step(self) -> list[Any]:
        self.steps += 1
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._used() + len(seq.prompt) + seq.generated > self.capacity:
                break
            self.running.append(self.waiting.pop(0))
        self.peak_running = max(self.peak_running, len(self.running))
        outputs = []
        for seq in list(self.running):
            seq.generated += 1
            while self._used() > self.capacity and seq in self.running:  # out of blocks: preempt the newest
                victim = self.running.pop()
                victim.generated = 0  # recomputed from scratch
                self.waiting.insert(0, victim)
                self.preemptions += 1
            if seq in self.running and seq.generated >= seq.max_tokens:
                self.running.remove(seq)
                req = self.requests[seq.request_id]
                req["done"][seq.index] = seq.generated
                if len(req["done"]) == req["n"]:
                    outputs.append(self._output(seq.request_id, req))
        return outputs

    def _output(self, request_id: str, req: dict[str, Any]) -> Any:
        samples = [
            types.SimpleNamespace(
                index=i,
                token_ids=[7] * k,
                text="x" * k,
                finish_reason="length",
                stop_reason=None,
                logprobs=None,
                cumulative_logprob=None,
            )
            for i, k in sorted(req["done"].items())
        ]
        return types.SimpleNamespace(
            request_id=request_id, finished=True, outputs=samples, prompt_token_ids=req["prompt"]
        )


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> str:
        return " ".join(m["content"] for m in messages)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": [[0 if w == "BAD" else 5 for w in t.split()] for t in texts]}


class FakeLLM:
    def __init__(self, engine: FakeLLMEngine) -> None:
        self.llm_engine = engine

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a module named vllm on the path with what VllmEngine imports from it."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "fake"
    vllm.SamplingParams = FakeSamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final")
    inputs = types.ModuleType("vllm.inputs")
    inputs.tokens_input = lambda ids: {"prompt_token_ids": ids}
    for name, module in {"vllm": vllm, "vllm.sampling_params": sampling, "vllm.inputs": inputs}.items():
        monkeypatch.setitem(sys.modules, name, module)


def make_engine(
    kv_budget: float | None,
    capacity: int,
    n: int = 4,
    max_tokens: int = 64,
    ignore_eos: bool = True,
    longest_first: bool = False,
):
    from hpcrollout.engines.vllm_engine import VllmEngine

    config = build_config(
        {
            "backend": "vllm",
            "model": {"path": "/nonexistent"},
            "engine": {"kv_budget": kv_budget, "longest_first": longest_first},
            "sampling": {"n": n, "max_tokens": max_tokens, "ignore_eos": ignore_eos, "seed": 3},
        }
    )
    fake = FakeLLMEngine(capacity)
    return VllmEngine(config, llm=FakeLLM(fake)), fake


def requests(lengths: list[int], words: int = 20) -> list[PromptRequest]:
    out = []
    for row, max_tokens in enumerate(lengths):
        uid = f"u{row:04d}"
        messages = [{"role": "user", "content": " ".join(["w"] * (words + row % 7))}]
        out.append(
            PromptRequest(
                uid=uid, row=row, messages=messages, text=None, seed=prompt_seed(3, uid), max_tokens=max_tokens
            )
        )
    return out


# ------------------------------------------------------------------------------------------ tests
def test_budget_keeps_the_engine_from_preempting_and_every_prompt_comes_back_once(fake_vllm):
    lengths = [64] * 60  # 60 prompts x 4 samples x ~84 tokens: ~20k tokens wanted, 6k held
    results = {}
    for budget in (None, 1.0):
        engine, fake = make_engine(budget, capacity=6000)
        got = list(engine.generate(requests(lengths)))
        assert sorted(r.row for r in got) == list(range(60))  # each prompt exactly once
        assert all(r.error is None and [s.num_tokens for s in r.samples] == [64] * 4 for r in got)
        results[budget] = fake
    assert results[None].preemptions > 0  # everything handed over at once: the cache overflows
    assert results[1.0].preemptions == 0
    info = engine.describe()["admission"]
    assert 0 < info["peak_reserved_tokens"] <= info["kv_budget_tokens"] == 6000


def test_longest_first_submits_the_largest_prompts_first(fake_vllm):
    lengths = [16, 200, 32, 16, 120, 48, 16, 300]
    engine, fake = make_engine(1.0, capacity=100_000, max_tokens=400, longest_first=True)
    list(engine.generate(requests(lengths)))
    rows = [int(rid.split("-")[0]) for rid in fake.added]
    # most output tokens first; among equals, the longer prompt (requests() gives row r 20 + r % 7 words)
    assert rows == sorted(range(len(lengths)), key=lambda r: (-lengths[r], -(r % 7)))


def test_by_default_prompts_go_in_input_order(fake_vllm):
    engine, fake = make_engine(1.0, capacity=100_000, max_tokens=400)
    list(engine.generate(requests([16, 200, 32, 16, 120])))
    assert [int(rid.split("-")[0]) for rid in fake.added] == [0, 1, 2, 3, 4]


def test_without_a_budget_everything_is_handed_over_at_once(fake_vllm):
    engine, fake = make_engine(None, capacity=500, max_tokens=400, longest_first=True)
    stream = engine.generate(requests([16, 200, 32, 16]))
    next(stream)
    assert len(fake.added) == 4  # all submitted before the first result, though the cache holds one prompt
    assert len(list(stream)) == 3


def test_rejected_and_too_long_prompts_are_error_rows_and_free_their_room(fake_vllm):
    engine, fake = make_engine(1.0, capacity=2000)
    reqs = requests([64] * 12)
    reqs[3].messages[0]["content"] = "BAD " + reqs[3].messages[0]["content"]  # vLLM rejects it at add_request
    reqs[5].messages[0]["content"] = " ".join(["w"] * 5000)  # longer than max_model_len
    got = {r.row: r for r in engine.generate(reqs)}
    assert sorted(got) == list(range(12))
    assert "vLLM rejected the prompt" in got[3].error
    assert "more than engine.max_model_len" in got[5].error
    assert all(got[r].error is None for r in got if r not in (3, 5))
    assert engine.admission.reserved == 0 and engine.admission.inflight_seqs == 0


def test_closing_early_aborts_what_is_in_flight(fake_vllm):
    engine, fake = make_engine(1.0, capacity=3000)
    stream = engine.generate(requests([64] * 30))
    first = next(stream)
    stream.close()
    assert first.error is None
    assert fake.aborted and set(fake.aborted) <= set(fake.added)
    assert not fake.running and not fake.waiting


def test_a_prompt_larger_than_the_budget_still_runs(fake_vllm):
    engine, fake = make_engine(0.25, capacity=2000, max_tokens=300)  # budget 500 tokens; one prompt wants 1.3k
    got = list(engine.generate(requests([300, 300, 300])))
    assert sorted(r.row for r in got) == [0, 1, 2]


def test_without_ignore_eos_the_expected_length_is_learned():
    adm = Admission(
        capacity_tokens=100_000, fraction=1.0, n=4, ignore_eos=False, block_size=16, warmup_seqs=8, longest_first=True
    )
    assert adm.fill_ratio is None and adm.cost(100, 1000) == 100 + 4 * (1000 + 16)
    adm.add("a", 100, 1000)
    adm.add("b", 100, 1000)
    adm.add("c", 100, 1000)
    assert adm.take()[0] == "a" and adm.take()[0] == "b"
    assert adm.take() is None  # warming up: 8 sequences at most until samples have finished
    for _ in range(4):
        adm.done(adm.cost(100, 1000), [(250, 1000)] * 4)  # samples stop at a quarter of their budget
    assert adm.fill_ratio == pytest.approx(0.25)
    assert adm.cost(100, 1000) == 100 + 4 * (250 + 16)
    adm = Admission(capacity_tokens=100_000, fraction=1.0, n=4, ignore_eos=True)
    assert adm.fill_ratio == 1.0 and adm.cost(100, 1000) == 100 + 4 * 1016
