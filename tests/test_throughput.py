"""Live throughput: tokens generated per second from the engine itself (in-flight samples included), the engine's
rate in every heartbeat, log line, progress bar and status (dynamic mode too), ETA on tokens when budgets are exact.

Issue 10: 30 s into a run the log said 207 tok/s while vLLM generated 15k tok/s (only finished prompts were
counted), and in dynamic mode status showed 0.0 tok/s and no ETA (every new unit started its rates at 0).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from hpcrollout.engines import create_engine
from hpcrollout.engines.base import Engine, PromptRequest, PromptResult, Sample
from hpcrollout.run import bar_updater
from hpcrollout.rundir import read_json
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from hpcrollout.worker import EngineMeter, run_task
from tests.conftest import make_config, make_prompts, write_input


class CountingEngine(Engine):
    """Generates 1000 tokens of in-flight samples per tick of a fake clock before each prompt finishes."""

    name = "counting"

    def __init__(self, config, clock: list[float]) -> None:  # noqa: ANN001
        super().__init__(config)
        self.clock, self.generated = clock, 0

    def tokens_generated(self) -> int:
        return self.generated

    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        for r in requests:
            for _ in range(10):  # ten seconds of decoding, 1000 tok/s, before the prompt finishes
                self.clock[0] += 1.0
                self.generated += 1000
            yield PromptResult(r.uid, r.row, [Sample("x", 5000, "length", r.seed), Sample("y", 5000, "length", r.seed + 1)])


def test_the_meter_counts_tokens_still_decoding(tiny_model, tmp_path):
    clock = [100.0]
    config = make_config(tmp_path, tiny_model, tmp_path / "unused.parquet")
    engine = CountingEngine(config, clock)
    meter = EngineMeter(engine, clock=lambda: clock[0])
    engine.generated += 3000  # three seconds into a long prompt: nothing finished yet
    clock[0] += 3.0
    live = meter.sample()
    assert live["tokens_per_s"] == 1000.0 and live["inflight_tokens"] == 3000 and live["prompts_per_s"] == 0.0
    # an engine that cannot count (None) falls back to the tokens of finished prompts
    class Blind(CountingEngine):
        def tokens_generated(self) -> None:
            return None

    blind = EngineMeter(Blind(config, clock), clock=lambda: clock[0])
    blind.add(PromptResult("u", 0, [Sample("x", 40, "stop", 1)]))
    clock[0] += 2.0
    assert blind.sample()["tokens_per_s"] == 20.0


def test_transformers_backend_counts_as_it_decodes(tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.parquet", make_prompts(1))
    config = make_config(tmp_path, tiny_model, inp, sampling={"n": 2, "max_tokens": 8, "ignore_eos": True})
    engine = create_engine(config)
    seen: list[int] = []
    choose = engine._choose
    engine._choose = lambda logits, gens: (seen.append(engine.tokens_generated()), choose(logits, gens))[1]
    request = PromptRequest("u", 0, [{"role": "user", "content": "hi"}], None, seed=1)
    (result,) = list(engine.generate([request]))
    assert seen == [0, 2, 4, 6, 8, 10, 12, 14]  # counted step by step, before the prompt finished
    assert engine.tokens_generated() == sum(s.num_tokens for s in result.samples) == 16


def test_heartbeats_carry_the_engine_rate_and_a_token_eta(tiny_model, tmp_path):
    """Exact budgets (ignore_eos): the ETA is tokens left / generated tok/s; every heartbeat names the engine."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    config = make_config(
        tmp_path, tiny_model, inp, sampling={"n": 2, "max_tokens": 6, "ignore_eos": True},
        checkpoint={"every_prompts": 100, "every_seconds": 1000, "heartbeat_seconds": 0.001},
    )
    rundir = prepare_run(config)
    beats = []

    def on_result(result, meter):  # noqa: ANN001
        time.sleep(0.01)  # the next heartbeat is due (heartbeat_seconds above)
        beats.append(read_json(rundir.heartbeat(0)))

    run_task(rundir.root, 0, on_result=on_result)
    running = [b for b in beats if b["state"] == "running" and b["prompts_done_this_attempt"] >= 1]
    assert running, beats
    hb = running[-1]
    assert hb["engine_id"] and hb["tokens_per_s"] > 0 and hb["eta_basis"] == "tokens"
    assert hb["token_budget_left"] == (6 - hb["prompts_done"]) * 2 * 6
    assert hb["engine_tokens"] >= hb["output_tokens_this_attempt"]


def test_status_counts_each_engine_once_and_eta_on_tokens(tiny_model, tmp_path):
    """Two shards in flight on one engine (a unit boundary in dynamic mode): its rate once, not twice, and a
    fresh unit shows the engine's rate, not 0."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(12))
    config = make_config(
        tmp_path, tiny_model, inp, sampling={"n": 2, "max_tokens": 100, "ignore_eos": True},
        sharding={"mode": "dynamic", "num_shards": 3},
    )
    rundir = prepare_run(config)
    now = time.time()
    common = {"state": "running", "started": now, "engine_id": "e1", "tokens_per_s": 400.0, "prompts_per_s": 1.0}
    rundir.write_heartbeat(0, prompts_total=4, prompts_done=3, prompts_done_this_attempt=3, token_budget_left=200, **common)
    rundir.write_heartbeat(1, prompts_total=4, prompts_done=0, prompts_done_this_attempt=0, token_budget_left=800, **common)
    st = run_status(rundir.root)
    assert [e["state"] for e in st["shards"]] == ["running", "running", "pending"]
    assert st["tokens_per_s"] == 400.0  # one engine
    # tokens left: 200 + 800 from the heartbeats, and shard 2's 4 prompts x 2 samples x 100 tokens
    assert st["eta_basis"] == "tokens" and st["eta_s"] == (200 + 800 + 800) / 400.0
    text = format_status(st)
    assert "throughput 400.0 generated tok/s" in text and "ETA 0m04s (tokens left" in text
    (row,) = [line for line in text.splitlines() if line.split()[:1] == ["1"]]
    assert row.split()[5] == "400.0"  # the unit just opened shows its engine's rate, not 0


def test_progress_bar_shows_generated_tokens_per_second(tiny_model, tmp_path):
    clock = [0.0]
    engine = CountingEngine(make_config(tmp_path, tiny_model, tmp_path / "x.parquet"), clock)
    meter = EngineMeter(engine, clock=lambda: clock[0])

    class Bar:
        postfix, n = "", 0

        def set_postfix_str(self, text: str, refresh: bool = True) -> None:
            self.postfix = text

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    engine.generated, clock[0] = 15000, 1.0
    bar_updater(bar)(PromptResult("u", 0), meter)
    assert bar.n == 1 and bar.postfix == "15,000 generated tok/s"


def test_vllm_counter_is_read_from_vllm(monkeypatch):
    """The vLLM backend reads vllm:generation_tokens (stats kept on); the CPU stand-in plays vLLM here."""
    from types import SimpleNamespace

    from hpcrollout.config import build_config
    from hpcrollout.engines import vllm_engine

    config = build_config({"backend": "vllm", "model": {"path": "/m"}})
    assert vllm_engine.llm_kwargs(config)["disable_log_stats"] is False
    engine = vllm_engine.VllmEngine.__new__(vllm_engine.VllmEngine)
    metrics = [SimpleNamespace(name="vllm:prompt_tokens", value=5.0), SimpleNamespace(name="vllm:generation_tokens", value=1234.0)]
    engine.llm = SimpleNamespace(get_metrics=lambda: metrics)
    assert engine.tokens_generated() == 1234
    engine.llm = SimpleNamespace()  # no get_metrics (older vLLM, or stats switched off): the worker counts
    assert engine.tokens_generated() is None


