"""The vLLM backend's submission loop on CPU, against a stand-in for vLLM's engine that simulates its KV cache.

The stand-in (FakeLLMEngine) schedules like vLLM's v1 scheduler in the ways that matter here: a waiting
request is admitted when its prompt fits in the free KV cache, every running sequence grows by one token per
step, and when the cache runs out the newest running request is preempted (its blocks freed, its output
recomputed later). The real engine is tested on a GPU (tests/gpu); this checks the admission rules
(engine.kv_budget, longest first) and that every prompt comes back exactly once, which CI can run.
"""

from __future__ import annotations

import logging
import random
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from hpcrollout.config import build_config
from hpcrollout.engines.admission import Admission, _Projection
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
        if kw.get("min_tokens", 0) > self.max_tokens:  # one of vLLM's own checks, as vLLM words it
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {kw['min_tokens']}.")


@dataclass
class FakeStructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams: its fields, and its check that one constraint is given."""

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.json, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("You can only use one kind of structured outputs constraint")


@dataclass
class FakeLoRARequest:
    """vllm.lora.request.LoRARequest: name, id (> 0) and path."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class _Seq:
    request_id: str
    index: int
    prompt: list[int]
    max_tokens: int
    length: int  # where the sample ends: max_tokens with ignore_eos, else drawn (unknown to the admission)
    generated: int = 0

    @property
    def child_id(self) -> str:
        return f"{self.index}_{self.request_id}"  # vLLM's ParentRequest.get_child_info naming


class FakeOutputProcessor:
    """vLLM's OutputProcessor as far as the backend hooks it: request_states and process_outputs."""

    def __init__(self) -> None:
        self.request_states: dict[str, Any] = {}

    def process_outputs(self, outputs: list[Any], engine_core_timestamp: Any = None, iteration_stats: Any = None):
        for out in outputs:
            if out.finish_reason is not None:
                self.request_states.pop(out.request_id, None)
        return types.SimpleNamespace(request_outputs=[], reqs_to_abort=[])


class FakeLLMEngine:
    """vLLM's scheduling, reduced to KV-cache bookkeeping in 16-token blocks (one token per sequence per step).

    The n samples of a request are child sequences (as in vLLM v1), each finishing on its own: at max_tokens
    with ignore_eos, otherwise at a length drawn from ``eos_lengths`` (geometric-like, unknown in advance).
    Every step's new tokens go through ``output_processor.process_outputs`` as vLLM's LLMEngine.step does.
    """

    def __init__(
        self, capacity: int, max_num_seqs: int = 256, max_model_len: int = 4096, eos_mean: float | None = None
    ) -> None:
        self.capacity, self.max_num_seqs, self.eos_mean = capacity, max_num_seqs, eos_mean
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len)
        cache = types.SimpleNamespace(num_gpu_blocks=capacity // 16, block_size=16, enable_prefix_caching=False)
        self.vllm_config = types.SimpleNamespace(
            cache_config=cache, scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs)
        )
        self.output_processor = FakeOutputProcessor()
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.requests: dict[str, dict[str, Any]] = {}
        self.steps = self.preemptions = self.peak_running = self.peak_used = 0
        self.added: list[str] = []
        self.aborted: list[str] = []

    def add_request(
        self, request_id: str, prompt: dict[str, Any], params: FakeSamplingParams, lora_request: Any = None
    ) -> None:
        ids = prompt["prompt_token_ids"]
        if 0 in ids:
            raise ValueError("token id 0 is not in the vocabulary")  # how a rejected prompt looks
        self.added.append(request_id)
        self.requests[request_id] = {"prompt": ids, "n": params.n, "done": {}, "seed": params.seed, "params": params, "lora": lora_request, "input": prompt}
        for i in range(params.n):
            length = params.max_tokens
            if not params.ignore_eos and self.eos_mean:
                rng = random.Random(f"{params.seed}-{i}")
                length = min(params.max_tokens, 1 + int(rng.expovariate(1 / self.eos_mean)))
            seq = _Seq(request_id, i, ids, params.max_tokens, length)
            self.waiting.append(seq)
            self.output_processor.request_states[seq.child_id] = types.SimpleNamespace(
                external_req_id=request_id, request_index=i
            )

    def abort_request(self, ids: list[str]) -> None:
        self.aborted += ids
        drop = set(ids)
        self.waiting = [s for s in self.waiting if s.request_id not in drop]
        self.running = [s for s in self.running if s.request_id not in drop]

    def _used(self) -> int:
        return sum(-(-(len(s.prompt) + s.generated) // 16) * 16 for s in self.running)  # whole blocks, as vLLM

    def step(self) -> list[Any]:
        self.steps += 1
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._used() + -(-(len(seq.prompt) + seq.generated) // 16) * 16 > self.capacity:
                break
            self.running.append(self.waiting.pop(0))
        self.peak_running = max(self.peak_running, len(self.running))
        outputs, core_outputs, preempted = [], [], 0
        for seq in list(self.running):
            seq.generated += 1
            while self._used() > self.capacity and seq in self.running:  # out of blocks: preempt the newest
                victim = self.running.pop()
                victim.generated = 0  # recomputed from scratch
                self.waiting.insert(0, victim)
                self.preemptions += 1
                preempted += 1
            if seq not in self.running:
                continue
            self.peak_used = max(self.peak_used, self._used())
            ended = seq.generated >= seq.length
            core_outputs.append(
                types.SimpleNamespace(request_id=seq.child_id, new_token_ids=[7], finish_reason="x" if ended else None)
            )
            if ended:
                self.running.remove(seq)
                req = self.requests[seq.request_id]
                req["done"][seq.index] = seq.generated
                if len(req["done"]) == req["n"]:
                    outputs.append(self._output(seq.request_id, req))
        stats = types.SimpleNamespace(num_preempted_reqs=preempted)
        self.output_processor.process_outputs(core_outputs, engine_core_timestamp=None, iteration_stats=stats)
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
    """Words are token 5 ("BAD": 0, which the stand-in engine rejects); an image part is one IMG, token 9."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        def text(content: Any) -> str:
            if isinstance(content, str):
                return content
            return " ".join("IMG" if p["type"] == "image" else p["text"] for p in content)

        return " ".join(text(m["content"]) for m in messages)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        ids = {"BAD": 0, "IMG": 9}
        return {"input_ids": [[ids.get(w, 5) for w in t.split()] for t in texts]}


IMAGE_TOKENS = 16  # what the stand-in renderer expands each image placeholder to


class FakeRenderer:
    """vLLM 0.26's LLM.renderer.render_cmpl for token prompts with images: the processed multimodal input, each
    placeholder (9) expanded to IMAGE_TOKENS tokens; records the calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def render_cmpl(self, prompts: list[dict[str, Any]], skip_mm_cache: bool = False) -> list[dict[str, Any]]:
        self.calls.append({"prompts": prompts, "skip_mm_cache": skip_mm_cache})
        out = []
        for prompt in prompts:
            ids = [t for tok in prompt["prompt_token_ids"] for t in ([9] * IMAGE_TOKENS if tok == 9 else [tok])]
            out.append({"type": "multimodal", "prompt_token_ids": ids, "mm_hashes": prompt["multi_modal_uuids"]})
        return out


class FakeLLM:
    def __init__(self, engine: FakeLLMEngine) -> None:
        self.llm_engine = engine

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[FakeLLMEngine]:
    """Put a module named vllm on the path with what VllmEngine imports from it; vllm.LLM starts a stand-in
    engine (those started are in the returned list)."""
    started: list[FakeLLMEngine] = []

    def start_llm(**kwargs: Any) -> FakeLLM:
        started.append(FakeLLMEngine(100_000))
        started[-1].llm_kwargs = kwargs
        return FakeLLM(started[-1])

    vllm = types.ModuleType("vllm")
    vllm.__version__ = "fake"
    vllm.SamplingParams = FakeSamplingParams
    vllm.LLM = start_llm
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final")
    sampling.StructuredOutputsParams = FakeStructuredOutputsParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.tokens_input = lambda ids: {"prompt_token_ids": ids}
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = FakeLoRARequest
    modules = {"vllm": vllm, "vllm.sampling_params": sampling, "vllm.inputs": inputs, "vllm.lora.request": lora}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("hpcrollout.engines.vllm_compat._warned", set())  # each test sees its own warnings
    # the CLI's logging setup (run by earlier tests in this process) stops propagation; caplog needs it
    monkeypatch.setattr(logging.getLogger("hpcrollout"), "propagate", True)
    # The projection is rebuilt on every change of progress here, so the outcomes do not depend on the
    # machine's speed (the backend rebuilds it at most every 0.1 s of the client's time).
    monkeypatch.setattr("hpcrollout.engines.admission._REBUILD_S", 0.0)
    return started


def make_engine(
    kv_budget: float | None,
    capacity: int,
    n: int = 4,
    max_tokens: int = 64,
    ignore_eos: bool = True,
    longest_first: bool = False,
    eos_mean: float | None = None,
    max_num_seqs: int = 256,
    pacing: Any = "auto",
    **sampling: Any,
):
    from hpcrollout.engines.vllm_engine import VllmEngine

    config = build_config(
        {
            "backend": "vllm",
            "model": {"path": "/nonexistent"},
            "engine": {"kv_budget": kv_budget, "longest_first": longest_first, "pacing": pacing},
            "sampling": {"n": n, "max_tokens": max_tokens, "ignore_eos": ignore_eos, "seed": 3, **sampling},
        }
    )
    fake = FakeLLMEngine(capacity, max_num_seqs=max_num_seqs, eos_mean=eos_mean)
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
    assert 0 < info["peak_projected_tokens"] <= info["kv_budget_tokens"] == 6000


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
    assert engine.admission.reserved == 0 and engine.admission.inflight_seqs == 0 and not engine.admission.flights


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
    adm = Admission(capacity_tokens=100_000, fraction=1.0, n=4, ignore_eos=False, block_size=16, prefix_caching=False)
    assert adm.fill_ratio is None and adm.cost(100, 1000) == 4 * 1104  # its budget until samples finish
    for _ in range(4):
        _, key = (adm.add("a", 100, 1000), adm.take())[1]
        for i in range(4):
            adm.advance(key, i, 250, finished=True)  # samples stop at a quarter of their budget
        adm.done(key)
    assert adm.fill_ratio == pytest.approx(0.25)
    assert adm.cost(100, 1000) == 4 * 352  # 100 prompt + 250 expected, in 16-token blocks
    assert adm.expected_length(300, 1000) == 1000  # longer than any finished sample: its budget bounds it
    adm = Admission(capacity_tokens=100_000, fraction=1.0, n=4, ignore_eos=True, prefix_caching=False)
    assert adm.fill_ratio == 1.0 and adm.cost(100, 1000) == 4 * 1104


def brute_force_peak(adm: Admission, prompt_tokens: int, max_tokens: int) -> int:
    """max over the newcomer's life of the KV tokens the flights plus the newcomer hold, step by step."""
    sizes = []
    for f in adm.flights.values():
        sizes.append([(f.prompt_tokens, g, max_tokens_ - g) for g, max_tokens_, done in
                      zip(f.generated, [f.max_tokens] * adm.n, f.finished) if not done])
    sizes.append([(prompt_tokens, 0, max_tokens)] * adm.n)
    peak = 0
    for k in range(max_tokens + 1):  # while the newcomer runs: what admitting it can push over the budget
        held = 0
        for prompt in sizes:
            alive = [(p, g) for p, g, r in prompt if k <= r]
            if alive:
                held += adm._shared(alive[0][0])
                held += sum(adm._own(p) + g + k + adm.block_size - 1 for p, g in alive)
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_the_projected_peak_is_the_step_by_step_maximum(prefix_caching):
    rng = random.Random(5)
    adm = Admission(capacity_tokens=10**9, fraction=1.0, n=3, ignore_eos=True, prefix_caching=prefix_caching)
    for _ in range(12):  # flights at different stages, some samples finished
        adm.add("x", rng.randint(1, 90), rng.randint(5, 120))
    keys = [adm.take()[1] for _ in range(12)]
    for key in keys:
        f = adm.flights[key]
        for i in range(3):
            if rng.random() < 0.2:
                adm.advance(key, i, f.max_tokens - f.generated[i], finished=True)
            else:
                adm.advance(key, i, rng.randint(0, f.max_tokens - 1), finished=False)
    for prompt_tokens, max_tokens in [(40, 10), (3, 200), (77, 60), (16, 1)]:
        got = _Projection(adm).peak_with(prompt_tokens, max_tokens)
        assert got == brute_force_peak(adm, prompt_tokens, max_tokens)


def test_known_lengths_never_overflow_and_staggered_prompts_share_the_cache(fake_vllm):
    rng = random.Random(11)
    lengths = [min(400, max(8, int(rng.lognormvariate(4.0, 1.0)))) for _ in range(120)]  # a long tail
    engine, fake = make_engine(1.0, capacity=8000, n=4, max_tokens=400)
    got = list(engine.generate(requests(lengths)))
    assert sorted(r.row for r in got) == list(range(120))  # each prompt exactly once
    assert all([s.num_tokens for s in r.samples] == [lengths[r.row]] * 4 for r in got)
    assert fake.preemptions == 0 and fake.peak_used <= 8000  # the projection never let the cache overflow
    # Reserving each prompt's largest size for its whole life (the rule before) would have kept at most
    # floor(8000 / its peak) prompts in flight; sharing the cache as they grow runs many more at once.
    biggest = max(4 * (len(r.samples[0].text) + 20 + 6 + 16) for r in got)
    assert fake.peak_running > 4 * (8000 // biggest)
    assert engine.describe()["preemptions"] == 0
    assert engine.describe()["generated_tokens"] == 4 * sum(lengths)
    assert engine.tokens_generated() == 4 * sum(lengths)  # live throughput reads the stream's count


def test_unknown_lengths_overflow_rarely_and_preemptions_are_counted(fake_vllm):
    lengths = [300] * 400  # max_tokens 300; samples end at eos after ~60 tokens on average (deterministic draws)
    runs = {}
    for budget in (1.0, None):
        engine, fake = make_engine(budget, capacity=6000, n=4, max_tokens=300, ignore_eos=False, eos_mean=60.0)
        got = list(engine.generate(requests(lengths)))
        assert sorted(r.row for r in got) == list(range(400))
        assert engine.describe()["preemptions"] == fake.preemptions  # the backend counts what vLLM did
        runs[budget] = (fake, engine.admission.describe())
    projected, everything = runs[1.0][0], runs[None][0]
    assert runs[1.0][1]["expected_fill_ratio"] == pytest.approx(60 / 300, rel=0.35)  # learned from samples
    # The projection is an expectation: with ~70 samples in this small cache, the ones that run long still
    # overflow it now and then (vLLM's preemption is the safety net, and is counted), far less than without it
    assert 0 < projected.preemptions < everything.preemptions / 3
    # ... and the cache is kept about as full (in this stand-in a preemption costs only the tokens redone; on
    # a GPU it also costs the recompute's prefill)
    assert projected.steps <= everything.steps * 1.1


def test_no_more_samples_in_flight_than_vllm_runs(fake_vllm):
    engine, fake = make_engine(1.0, capacity=10**6, n=4, max_tokens=32, max_num_seqs=16)
    got = list(engine.generate(requests([32] * 40)))
    assert len(got) == 40 and fake.peak_running <= 16 and not any(len(fake.waiting) for _ in [0])


# ------------------------------------------------------------------------------------------ sampling.kwargs
def test_sampling_kwargs_reach_every_request_as_they_are(fake_vllm):
    extra = {"min_tokens": 3, "bad_words": ["foo"], "logit_bias": {5: -2.0}, "truncate_prompt_tokens": 64}
    engine, fake = make_engine(1.0, capacity=100_000, max_tokens=16, kwargs=extra)
    got = list(engine.generate(requests([16, 8, 16])))
    assert sorted(r.row for r in got) == [0, 1, 2] and len(fake.requests) == 3
    for req in fake.requests.values():
        params = req["params"]
        assert {k: params.extra[k] for k in extra} == extra
        assert params.extra["temperature"] == 1.0 and params.output_kind == "final"  # the listed keys still set
    assert sorted(req["params"].max_tokens for req in fake.requests.values()) == [8, 16, 16]  # per-prompt budgets


def test_logit_bias_token_ids_reach_vllm_as_integers_after_the_run_config_round_trip():
    from hpcrollout.config import load_config
    from hpcrollout.engines.vllm_engine import sampling_kwargs

    config = build_config({"sampling": {"kwargs": {"logit_bias": {5: -2.0, 7: 1.0}}}})
    assert config.model_dump(mode="json")["sampling"]["kwargs"]["logit_bias"] == {"5": -2.0, "7": 1.0}
    reread = load_config(base={k: v for k, v in config.model_dump(mode="json").items() if k != "run_dir"})
    assert sampling_kwargs(reread)["logit_bias"] == {5: -2.0, 7: 1.0}


def test_vllm_rejecting_sampling_kwargs_names_the_key_before_the_engine_starts(fake_vllm):
    from hpcrollout.errors import HpcRolloutError

    with pytest.raises(HpcRolloutError, match=r"^sampling.kwargs: vLLM fake rejects these settings: min_tokens must"):
        make_engine(1.0, capacity=100_000, max_tokens=16, kwargs={"min_tokens": 17})


# ------------------------------------------------------------------------------------------ structured outputs
def test_the_run_constraint_reaches_every_request_and_responses_are_checked(fake_vllm):
    for constraint, valid in (({"regex": "x+"}, True), ({"choice": ["y", "yy"]}, False)):
        engine, fake = make_engine(1.0, capacity=100_000, n=2, max_tokens=8, structured_outputs=constraint)
        got = list(engine.generate(requests([8, 4, 8])))
        assert all(r.error is None and [s.schema_valid for s in r.samples] == [valid] * 2 for r in got)
        expected = FakeStructuredOutputsParams(**constraint)
        assert [req["params"].extra["structured_outputs"] for req in fake.requests.values()] == [expected] * 3


def test_vllm_rejecting_the_run_constraint_names_the_key(fake_vllm, monkeypatch):
    import hpcrollout.structured
    from hpcrollout.errors import HpcRolloutError

    def strict(**kw: Any) -> FakeStructuredOutputsParams:
        raise ValueError("grammar is not valid EBNF")

    monkeypatch.setattr(sys.modules["vllm.sampling_params"], "StructuredOutputsParams", strict)
    with pytest.raises(HpcRolloutError, match=r"^sampling.structured_outputs: vLLM fake rejects these settings: grammar"):
        make_engine(1.0, capacity=100_000, structured_outputs={"grammar": "root ::= nonsense"})
    assert hpcrollout.structured.CONSTRAINT_KEYS == ("json", "regex", "choice", "grammar")


def test_per_row_constraints_end_to_end_through_the_worker_merge_and_analyze(fake_vllm, tmp_path, tiny_model):
    """data.structured_outputs_column with the vLLM backend (stand-in engine): each row's constraint reaches its
    request, a null cell takes the run's, a bad cell is an error row naming the column; merged schema_valid."""
    from hpcrollout.analyze import analyze
    from hpcrollout.merge import merge_run
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_task
    from tests.conftest import make_config, make_prompts, write_input

    cells = ['{"regex": "x{4}"}', None, '{"choice": ["x"]}', "not json", '{"type": "string"}', '{"regex": "x{5}"}']
    rows = [dict(row, schema=cell) for row, cell in zip(make_prompts(6), cells, strict=True)]
    inp = write_input(tmp_path / "in.parquet", rows)
    config = make_config(
        tmp_path,
        tiny_model,
        inp,
        backend="vllm",
        data={"input": str(inp), "structured_outputs_column": "schema"},
        engine={"compile_cache": str(tmp_path / "cache")},
        sampling={"n": 2, "max_tokens": 4, "structured_outputs": {"regex": "x+"}},
    )
    rundir = prepare_run(config)
    run_task(rundir.root, 0)
    (fake,) = fake_vllm
    sent = {int(rid.split("-")[0]): req["params"].extra["structured_outputs"] for rid, req in fake.requests.items()}
    assert sent == {
        0: FakeStructuredOutputsParams(regex="x{4}"),
        1: FakeStructuredOutputsParams(regex="x+"),  # null cell: the run's constraint
        2: FakeStructuredOutputsParams(choice=["x"]),
        4: FakeStructuredOutputsParams(json={"type": "string"}),
        5: FakeStructuredOutputsParams(regex="x{5}"),
    }
    merge_run(rundir.root, tmp_path / "m.parquet")
    merged = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [r["responses"] for r in merged if r["error"] is None] == [["xxxx"] * 2] * 5  # the stand-in's text
    assert [r["schema_valid"] for r in merged] == [[True] * 2, [True] * 2, [False] * 2, [], [False] * 2, [False] * 2]
    assert merged[3]["error"].startswith("schema (data.structured_outputs_column): not JSON")
    report = analyze(tmp_path / "m.parquet")
    assert (report["schema_checked"], report["schema_valid"], report["schema_valid_frac"]) == (10, 4, 0.4)


# ------------------------------------------------------------------------------------------ LoRA adapters
def test_lora_adapters_per_row_end_to_end_through_the_worker(fake_vllm, tmp_path, tiny_model):
    """data.lora_column with the vLLM backend (stand-in engine): vLLM starts with enable_lora and the rank that
    holds every adapter found, each row's adapter reaches add_request (one id per adapter), an unreadable one
    is an error row naming it, and the adapter is recorded per row."""
    import json

    from hpcrollout.merge import merge_run
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_task
    from tests.conftest import make_config, make_prompts, write_input

    a, b, bad = (str(tmp_path / name) for name in ("a", "b", "missing"))
    for path, rank in ((a, 4), (b, 12)):
        Path(path).mkdir()
        (Path(path) / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    cells = [a, None, b, bad, a]
    inp = write_input(tmp_path / "in.parquet", [dict(r, adapter=c) for r, c in zip(make_prompts(5), cells, strict=True)])
    config = make_config(
        tmp_path,
        tiny_model,
        inp,
        backend="vllm",
        data={"input": str(inp), "lora_column": "adapter"},
        engine={"compile_cache": str(tmp_path / "cache")},
        sampling={"n": 2, "max_tokens": 4},
    )
    run_task(prepare_run(config).root, 0)
    (fake,) = fake_vllm
    assert {k: fake.llm_kwargs[k] for k in ("enable_lora", "max_lora_rank", "max_loras")} == {
        "enable_lora": True,
        "max_lora_rank": 16,  # the smallest rank vLLM takes that holds rank 12
        "max_loras": 2,
    }
    sent = {int(rid.split("-")[0]): req["lora"] for rid, req in fake.requests.items()}
    assert sent == {
        0: FakeLoRARequest(a, 1, a),
        1: None,
        2: FakeLoRARequest(b, 2, b),
        4: FakeLoRARequest(a, 1, a),
    }
    merge_run(tmp_path / "run", tmp_path / "m.parquet")
    merged = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [r["lora_adapter"] for r in merged] == cells
    assert merged[3]["error"].startswith(f"LoRA adapter {bad}: cannot read") and merged[3]["responses"] == []


def test_a_run_adapter_sets_the_engine_args_and_engine_kwargs_win(fake_vllm, tmp_path):
    import json

    from hpcrollout.engines.vllm_engine import llm_kwargs

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 64}))
    config = build_config({"model": {"path": "m", "lora": str(tmp_path)}})
    assert {k: llm_kwargs(config)[k] for k in ("enable_lora", "max_lora_rank", "max_loras")} == {
        "enable_lora": True,
        "max_lora_rank": 64,
        "max_loras": 1,
    }
    config = build_config({"model": {"path": "m", "lora": str(tmp_path)}, "engine": {"kwargs": {"max_loras": 4}}})
    assert llm_kwargs(config)["max_loras"] == 4
    from hpcrollout.errors import HpcRolloutError

    with pytest.raises(HpcRolloutError, match=r"^model.lora: LoRA adapter .*cannot read"):
        llm_kwargs(build_config({"model": {"path": "m", "lora": str(tmp_path / "nope")}}))


def test_pacing_staggers_equal_lengths_instead_of_waves_and_never_overflows(fake_vllm):
    from hpcrollout.benchmarks.admission_bound import simulate_hpcrollout

    # ~3.5 caches of work, every sample 200 tokens (ignore_eos): the greedy peak rule runs it in 4 waves that
    # each finish together; pacing starts prompts staggered, so the cache stays full and the work ends sooner
    # (the admission itself against the benchmark's step model of the cache).
    prompts = [30 + i % 7 for i in range(130)]
    greedy = simulate_hpcrollout(prompts, 4, 200, 40_000, 1024)
    paced = simulate_hpcrollout(prompts, 4, 200, 40_000, 1024, pacing=0.1)
    assert greedy["steps"] == 4 * 200 and paced["steps"] < 0.85 * greedy["steps"]
    assert paced["peak_projected"] <= 40_000
    # Through the backend and the stand-in engine: each prompt once, never over the cache, the bucket used.
    for pacing in (None, "auto"):
        engine, fake = make_engine(1.0, capacity=8000, n=4, max_tokens=200, max_num_seqs=1024, pacing=pacing)
        got = list(engine.generate(requests([200] * 50)))
        assert sorted(r.row for r in got) == list(range(50))
        assert all([s.num_tokens for s in r.samples] == [200] * 4 for r in got)
        assert fake.preemptions == 0 and fake.peak_used <= 8000  # known lengths: still never over the cache
        info = engine.admission.describe()
        assert (info["pacing"], info["paced"] > 0) == ((None, False) if pacing is None else (0.1, True))


def test_the_step_model_takes_per_prompt_lengths_and_never_overflows_with_them():
    """admission_bound with a long tail of known lengths: hpcrollout's rule stays within the cache and never
    beats the bound; raw vLLM preempts under pressure, but the newest samples it preempts are young, so it
    recomputes a small share of the tokens (why the long-tail target cannot come from avoiding preemption)."""
    from hpcrollout.benchmarks.admission_bound import (
        lognormal_lengths,
        lower_bound,
        prompt_lengths,
        simulate_hpcrollout,
        simulate_raw,
    )

    prompts = prompt_lengths(60, 0, 20, 80)
    lengths = lognormal_lengths(60, 0, 60.0, 1.0, 400)
    assert max(lengths) <= 400 and min(lengths) >= 16 and len(set(lengths)) > 30
    capacity = 12_000
    raw = simulate_raw(prompts, 4, lengths, capacity, 1024)
    hpcr = simulate_hpcrollout(prompts, 4, lengths, capacity, 1024)
    bound = lower_bound(prompts, 4, lengths, capacity)
    assert bound["parts"]["one sample"] == max(lengths)
    assert hpcr["peak_projected"] <= capacity and hpcr["steps"] >= bound["steps"]
    assert raw["preemptions"] > 0
    generated = 4 * sum(lengths)
    assert 0 < raw["tokens_redone"] < 0.25 * generated


def test_nothing_now_pauses_the_read_ahead_until_the_next_step(fake_vllm):
    """The backlog's NOTHING_NOW (the worker at its fair share of the work): the engine stops reading, steps what
    it holds, and reads again after the step; every request once, nothing aborted."""
    from hpcrollout.engines import NOTHING_NOW

    engine, fake = make_engine(1.0, capacity=100_000, n=2, max_tokens=20)
    reqs = requests([20] * 6)
    steps_at: list[int] = []

    def backlog():
        yield from reqs[:3]
        steps_at.append(fake.steps)
        yield NOTHING_NOW
        steps_at.append(fake.steps)  # asked again only after an engine step
        yield from reqs[3:]

    got = list(engine.generate(backlog()))
    assert sorted(r.row for r in got) == list(range(6)) and all(r.error is None for r in got)
    assert steps_at[1] > steps_at[0]
    assert all([s.num_tokens for s in r.samples] == [20, 20] for r in got)


def test_auto_pacing_stays_off_for_unequal_or_unknown_lengths_and_for_one_wave(fake_vllm):
    engine, _ = make_engine(1.0, capacity=8000, n=4, max_tokens=400, max_num_seqs=1024)
    list(engine.generate(requests([50, 400, 120, 300] * 10)))  # a mix: the greedy rule staggers by itself
    assert engine.admission.describe()["pacing"] is None and engine.admission.paced == 0
    engine, _ = make_engine(1.0, capacity=8000, n=4, max_tokens=200, ignore_eos=False, eos_mean=60.0)
    list(engine.generate(requests([200] * 40)))  # lengths unknown
    assert engine.admission.describe()["pacing"] is None and engine.admission.paced == 0
    # everything fits at once: no later wave to make room for, so nothing waits for the bucket
    engine, fake = make_engine(1.0, capacity=8000, n=4, max_tokens=200, max_num_seqs=1024)
    list(engine.generate(requests([200] * 8)))
    assert engine.admission.paced == 0 and fake.steps == 200


# ------------------------------------------------------------------------------------------ image prompts
def _png(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def image_requests() -> list[PromptRequest]:
    from hpcrollout.images import ImageInput

    content = [{"type": "image"}, {"type": "text", "text": "w w w"}]
    images = [(ImageInput("red.png", _png((255, 0, 0))),), (ImageInput("img[0]", b"junk"),), ()]
    out = []
    for row, pics in enumerate(images):
        messages = [{"role": "user", "content": content if pics else "w w w"}]
        out.append(PromptRequest(f"i{row}", row, messages, None, prompt_seed(3, f"i{row}"), images=pics))
    return out


def test_image_prompts_reach_add_request_through_vllms_renderer(fake_vllm):
    """vLLM 0.26: the image prompt is rendered by LLM.renderer.render_cmpl (skip_mm_cache: the sender-side cache
    is left alone) from the token ids with one placeholder and the decoded image, with its content hash as
    multi_modal_uuids; the rendered input reaches add_request and its expanded length is the prompt's."""
    from hpcrollout.images import ImageInput

    engine, fake = make_engine(1.0, capacity=6000, n=2, max_tokens=4)
    engine.llm.renderer = renderer = FakeRenderer()
    results = {r.row: r for r in engine.generate(image_requests())}
    (call,) = renderer.calls
    assert call["skip_mm_cache"] is True
    (prompt,) = call["prompts"]
    assert prompt["prompt_token_ids"] == [9, 5, 5, 5]
    (picture,) = prompt["multi_modal_data"]["image"]
    assert (picture.mode, picture.size, picture.getpixel((0, 0))) == ("RGB", (8, 8), (255, 0, 0))
    assert prompt["multi_modal_uuids"] == {"image": [ImageInput("red.png", _png((255, 0, 0))).digest]}
    sent = {int(rid.split("-")[0]): req["input"] for rid, req in fake.requests.items()}
    assert sent[0]["type"] == "multimodal" and sent[0]["prompt_token_ids"] == [9] * IMAGE_TOKENS + [5, 5, 5]
    assert sent[2] == {"prompt_token_ids": [5, 5, 5]}  # text rows: token ids as before
    assert results[0].error is None and results[0].prompt_tokens == IMAGE_TOKENS + 3
    assert results[1].error.startswith("bad image: row 1, image 0 (img[0]: not a readable image")
    assert results[2].error is None and 1 not in sent


def test_an_image_prompt_too_long_once_expanded_is_an_error_row(fake_vllm):
    engine, fake = make_engine(1.0, capacity=6000, n=1, max_tokens=4)
    engine.llm.renderer = FakeRenderer()
    engine.max_model_len = 10  # 4 tokens as written, 19 once the image is expanded
    results = {r.row: r for r in engine.generate(image_requests()[:1])}
    assert results[0].error.startswith("prompt has 19 tokens, more than engine.max_model_len=10")


def test_without_vllms_renderer_image_prompts_go_to_add_request_as_token_prompts(fake_vllm, caplog):
    engine, fake = make_engine(1.0, capacity=6000, n=1, max_tokens=4)
    with caplog.at_level("WARNING", logger="hpcrollout"):
        results = {r.row: r for r in engine.generate(image_requests())}
    (request,) = [req["input"] for req in fake.requests.values() if "multi_modal_data" in req["input"]]
    assert request["prompt_token_ids"] == [9, 5, 5, 5] and len(request["multi_modal_data"]["image"]) == 1
    assert results[0].error is None
    assert "has no LLM.renderer.render_cmpl; image prompts go to add_request as TokensPrompt" in caplog.text


# ------------------------------------------------------------------------------------------ vLLM versions
@pytest.mark.parametrize(("version", "tested"), [("0.26.0", True), ("0.27.1", False), ("fake", False)])
def test_the_tested_versions_are_logged_and_another_is_warned_about(fake_vllm, caplog, version, tested):
    sys.modules["vllm"].__version__ = version
    with caplog.at_level("INFO", logger="hpcrollout"):
        engine, _ = make_engine(1.0, capacity=6000)
    assert engine.api.tested is tested
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "not a version hpcrollout was tested" in r.message]
    assert len(warned) == (0 if tested else 1)
    expected = (
        "vLLM 0.26.0 (hpcrollout is tested with vLLM 0.26.0)"
        if tested
        else f"vLLM {version} is not a version hpcrollout was tested with (0.26.0)"
    )
    assert expected in caplog.text


def test_an_untested_vllm_without_flat_logprobs_does_not_get_it(fake_vllm):
    sys.modules["vllm"].__version__ = "0.30.0"
    FakeSamplingParams.__struct_fields__ = ("n", "max_tokens", "seed", "logprobs")  # as a msgspec Struct lists them
    try:
        engine, _ = make_engine(1.0, capacity=6000, logprobs=True)
    finally:
        del FakeSamplingParams.__struct_fields__
    assert "flat_logprobs" not in engine.base_sampling


def test_without_the_output_stream_hook_progress_is_off_with_one_warning(fake_vllm, caplog):
    """vLLM internals read by the backend, removed one by one: each feature turns off with one warning, and
    every prompt still comes back once."""
    engine, fake = make_engine(1.0, capacity=6000, n=2, max_tokens=8)
    del fake.output_processor
    with caplog.at_level("WARNING", logger="hpcrollout"):
        for _ in range(2):
            got = list(engine.generate(requests([8] * 5)))
            assert sorted(r.row for r in got) == list(range(5))
    assert caplog.text.count("per-sample progress is off") == 1
    assert engine.generated_tokens == 0 and not engine._watching


def test_request_states_without_the_fields_read_turn_progress_off(fake_vllm, caplog):
    engine, fake = make_engine(1.0, capacity=6000, n=2, max_tokens=8)
    add = fake.add_request

    def add_request(*args: Any, **kwargs: Any) -> None:
        add(*args, **kwargs)
        for state in fake.output_processor.request_states.values():
            state.__dict__.pop("request_index", None)

    fake.add_request = add_request
    with caplog.at_level("WARNING", logger="hpcrollout"):
        got = list(engine.generate(requests([8] * 5)))
    assert sorted(r.row for r in got) == list(range(5))
    assert "its output stream lacks request_index; per-sample progress is off" in caplog.text


def test_without_the_cache_and_model_configs_the_kv_budget_is_off_and_limits_come_from_the_config(fake_vllm, caplog):
    from hpcrollout.engines.vllm_engine import VllmEngine

    fake = FakeLLMEngine(6000)
    del fake.vllm_config, fake.model_config
    config = build_config(
        {
            "backend": "vllm",
            "model": {"path": "/nonexistent"},
            "engine": {"max_model_len": 300, "max_num_seqs": 32},
            "sampling": {"n": 2, "max_tokens": 8, "ignore_eos": True},
        }
    )
    with caplog.at_level("WARNING", logger="hpcrollout"):
        engine = VllmEngine(config, llm=FakeLLM(fake))
        got = list(engine.generate(requests([8] * 5)))
    assert (engine.max_model_len, engine.max_num_seqs) == (300, 32)
    assert sorted(r.row for r in got) == list(range(5)) and engine.admission.budget is None
    assert "engine.kv_budget is off" in caplog.text and "no LLMEngine.model_config.max_model_len" in caplog.text


def test_image_prompts_on_a_text_only_model_fail_the_task_naming_the_model(fake_vllm):
    from hpcrollout.errors import HpcRolloutError

    engine, fake = make_engine(1.0, capacity=6000, n=1, max_tokens=4)
    fake.model_config.is_multimodal_model = False  # vLLM's ModelConfig: no multimodal_config
    with pytest.raises(HpcRolloutError, match=r"^model.path: the input has image prompts, but /nonexistent is a text-only model"):
        list(engine.generate(image_requests()))


def test_an_image_prompt_vllms_processor_rejects_is_an_error_row(fake_vllm):
    engine, fake = make_engine(1.0, capacity=6000, n=1, max_tokens=4)
    renderer = engine.llm.renderer = FakeRenderer()

    def reject(prompts: list[dict[str, Any]], skip_mm_cache: bool = False) -> list[dict[str, Any]]:
        raise ValueError("Failed to apply LlavaProcessor on data={'images': ...}")

    renderer.render_cmpl = reject
    results = {r.row: r for r in engine.generate(image_requests())}
    assert results[0].error == (
        "vLLM rejected the image prompt: ValueError: Failed to apply LlavaProcessor on data={'images': ...}"
    )
    assert results[2].error is None  # the text row goes on
