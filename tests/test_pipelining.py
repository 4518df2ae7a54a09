"""A shard boundary is not a barrier: the next shard's prompts reach the engine before the last one drains."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from hpcrollout.engines.base import NOTHING_NOW, Engine, PromptRequest, PromptResult, Sample
from hpcrollout.merge import merge_run
from hpcrollout.shard import prepare_run
from hpcrollout.worker import ShardSource, TaskRunner
from tests.conftest import make_config, make_prompts, write_input


class WindowEngine(Engine):
    """Stands in for vLLM's scheduler: keeps `window` requests in flight, finishes them oldest first.

    (A fake on purpose: this test is about the worker's request stream, which a real engine would hide.)
    """

    name = "window"

    def __init__(self, config, window: int, events: list) -> None:
        super().__init__(config)
        self.window, self.events = window, events
        self.calls = self.pauses = 0

    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        # NOTHING_NOW stops reading ahead until the next step (one finished prompt), as the vLLM backend does
        self.calls += 1
        source, inflight, req = iter(requests), [], None
        while True:
            while len(inflight) < self.window and (req := next(source, None)) is not None:
                if req is NOTHING_NOW:
                    self.pauses += 1
                    break
                self.events.append(("pull", req.row))
                inflight.append(req)
            if not inflight:
                if req is None:
                    return
                continue
            req = inflight.pop(0)
            self.events.append(("done", req.row))
            samples = [Sample(text=f"r{req.row}-{i}", num_tokens=1, finish_reason="stop", seed=req.seed + i) for i in range(3)]
            yield PromptResult(uid=req.uid, row=req.row, samples=samples, prompt_tokens=1)


def test_next_shard_is_fed_before_the_previous_drains(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(15))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 3})
    rundir = prepare_run(config)
    events: list = []
    results = TaskRunner(rundir, config, WindowEngine(config, 4, events), ShardSource(rundir, [0, 1, 2])).run()
    assert sorted(r["shard"] for r in results) == [0, 1, 2] and all(r["state"] == "done" for r in results)
    last_done_of_shard0 = events.index(("done", 4))
    first_pull_of_shard1 = events.index(("pull", 5))
    assert first_pull_of_shard1 < last_done_of_shard0, events
    pulls = [row for kind, row in events if kind == "pull"]
    assert pulls == list(range(15))  # each prompt once, in order
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 15


class SlowTailEngine(Engine):
    """Finishes the first prompt at once, then keeps stepping (as vLLM does on long samples) without finishing
    another until the first prompt's part file is on disk, or a deadline passes."""

    name = "slow-tail"

    def __init__(self, config, parts_dir) -> None:
        super().__init__(config)
        self.parts_dir, self.committed_while_stepping = parts_dir, False

    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        reqs = list(requests)

        def result(req: PromptRequest) -> PromptResult:
            samples = [Sample(text="r", num_tokens=1, finish_reason="stop", seed=req.seed + i) for i in range(3)]
            return PromptResult(uid=req.uid, row=req.row, samples=samples, prompt_tokens=1)

        yield result(reqs[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.committed_while_stepping:
            self.stepped()  # one engine step, no prompt finished
            self.committed_while_stepping = any(self.parts_dir.glob("part-*.parquet"))
            time.sleep(0.01)
        for req in reqs[1:]:
            yield result(req)


def test_finished_prompts_are_committed_on_time_while_no_other_prompt_finishes(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    config = make_config(tmp_path, tiny_model, inp, checkpoint={"every_prompts": 100, "every_seconds": 0.2})
    rundir = prepare_run(config)
    engine = SlowTailEngine(config, rundir.parts_dir(0))
    results = TaskRunner(rundir, config, engine, ShardSource(rundir, [0])).run()
    assert results[0]["state"] == "done"
    assert engine.committed_while_stepping  # the first prompt's commit did not wait for the second result


def test_at_its_fair_share_the_engine_pauses_its_read_ahead_without_draining(tmp_path, tiny_model):
    """Claimed units and a fair share of two units' work (ShardSource.share): the engine's backlog says
    NOTHING_NOW while two units are in flight, the engine goes on generating, and the next unit comes once one
    finishes, all in one generate() call (no drain between units), each prompt once."""
    from hpcrollout.claims import ClaimBoard

    inp = write_input(tmp_path / "in.parquet", make_prompts(20))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 4, "mode": "dynamic"})
    rundir = prepare_run(config)
    source = ShardSource(rundir, board=ClaimBoard(rundir, "engine0"), claimants=2)  # a share of 2 units
    events: list = []
    engine = WindowEngine(config, 100, events)
    results = TaskRunner(rundir, config, engine, source).run()
    assert sorted(r["shard"] for r in results) == [0, 1, 2, 3] and all(r["state"] == "done" for r in results)
    assert engine.calls == 1 and engine.pauses >= 1 and source.held_back >= 1
    pulls = [row for kind, row in events if kind == "pull"]
    assert sorted(pulls) == list(range(20))  # each prompt once
    merge_run(rundir.root, tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 20
