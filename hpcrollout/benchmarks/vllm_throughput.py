"""Generation throughput of hpcrollout's worker vs raw vLLM vs a chunk-with-barrier script, side by side.

One process, one GPU, one vLLM engine reused by every way, on the same prompts and per-prompt settings:
  raw         ``LLM.chat`` on all prompts at once (no checkpoints): the ceiling
  hpcrollout  the real worker (prepare_run + run_shard) streaming results and committing part files
              every ``--every_seconds`` (<= 60 s); ``hpcrollout:B`` runs it with ``engine.kv_budget: B``
              (``hpcrollout:none``: no KV budget, the whole lookahead handed to vLLM at once)
  chunk       what a naive checkpointing script does: ``LLM.chat`` on ``--chunk_prompts`` prompts at a time,
              writing each chunk's results before starting the next (a barrier per chunk)
Workloads: ``headline`` (Qwen3-4B shape with dummy weights, every sample max_tokens long with ignore_eos),
``variable`` (per-prompt max_tokens drawn from a lognormal, a long tail) and ``eos`` (samples end at a stop
token, so max_tokens is only a bound and the lengths are unknown in advance: with dummy weights every token
is about equally likely, and ``--stop_tokens`` of them end a sample, which gives geometric lengths).
Engine start (and whether the compile cache was warm) is reported separately. Each device call has a time
limit, so pick ways per call:

    python -m hpcrollout.benchmarks.vllm_throughput --workload headline --ways raw,hpcrollout --out a.json
    python -m hpcrollout.benchmarks.vllm_throughput --workload headline --ways raw,chunk --out b.json
    python -m hpcrollout.benchmarks.vllm_throughput --workload variable --ways raw,hpcrollout,chunk
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpcrollout.engines.base import prompt_seed

log = logging.getLogger("hpcrollout")

_TEXT = (
    "the model reads a long question about rivers stars bread music chess clouds tides primes and answers it with "
    "care while explaining each step of the reasoning in plain words for a curious reader who likes detail"
)
WORDS = _TEXT.split()


def make_prompts(count: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat prompts of 30..300 words, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(30, 300))))
        prompts.append([{"role": "user", "content": f"Question {i}: {words}?"}])
    return prompts


def output_lengths(args: argparse.Namespace) -> list[int]:
    """max_tokens per prompt: all equal (headline, eos) or lognormal with a long tail (variable)."""
    if args.workload in ("headline", "eos"):
        return [args.max_tokens] * args.prompts
    rng = np.random.default_rng(args.seed + 1)
    draws = np.exp(rng.normal(np.log(args.median_tokens), args.sigma, size=args.prompts))
    return [int(x) for x in np.clip(np.round(draws), 16, args.max_tokens)]


def build_config(args: argparse.Namespace, model_dir: Path, run_dir: Path, input_path: Path) -> Any:
    from hpcrollout.config import build_config as build

    engine: dict[str, Any] = {
        "load_format": "dummy",
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    if args.max_num_seqs:
        engine["max_num_seqs"] = args.max_num_seqs
    # vLLM's stats on (for every way alike): the backend's output hook then counts preemptions per way
    engine["kwargs"] = {"disable_log_stats": False}
    tree = {
        "run_dir": str(run_dir),
        "backend": "vllm",
        "data": {"input": str(input_path), "id_column": "id", "max_tokens_column": "max_tokens"},
        "model": {"path": str(model_dir)},
        "engine": engine,
        "sampling": {
            "n": args.n,
            "max_tokens": args.max_tokens,
            "temperature": 1.0,
            "ignore_eos": args.workload != "eos",
            "stop_token_ids": list(range(args.stop_tokens)) if args.workload == "eos" else [],
            "seed": args.seed,
        },
        "sharding": {"num_shards": 1},
        "checkpoint": {"every_seconds": args.every_seconds, "every_prompts": 1_000_000},
    }
    return build(tree, "benchmark")


def params_for(engine: Any, seeds: list[int], lengths: list[int]) -> list[Any]:
    """One SamplingParams per prompt, exactly as the hpcrollout engine builds them."""
    return [
        engine._SamplingParams(**dict(engine.base_sampling, seed=s, max_tokens=m))
        for s, m in zip(seeds, lengths, strict=True)
    ]


def count_tokens(outputs: list[Any]) -> int:
    return sum(len(o.token_ids) for r in outputs for o in r.outputs)


def way_raw(engine: Any, prompts: list, seeds: list[int], lengths: list[int]) -> dict[str, Any]:
    params = params_for(engine, seeds, lengths)
    started = time.perf_counter()
    finished = FinishTimes()
    outputs = engine.llm.chat(prompts, params, use_tqdm=finished.bar)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "output_tokens": count_tokens(outputs), "finished_at": finished.summary()}


def way_chunk(
    engine: Any, prompts: list, seeds: list[int], lengths: list[int], chunk: int, out_dir: Path
) -> dict[str, Any]:
    from hpcrollout.rundir import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    params = params_for(engine, seeds, lengths)
    tokens, commits = 0, []
    started = time.perf_counter()
    for k, a in enumerate(range(0, len(prompts), chunk)):
        outputs = engine.llm.chat(prompts[a : a + chunk], params[a : a + chunk], use_tqdm=False)
        tokens += count_tokens(outputs)
        table = pa.table(
            {
                "row": [a + i for i in range(len(outputs))],
                "responses": [[o.text for o in r.outputs] for r in outputs],
                "response_tokens": [[len(o.token_ids) for o in r.outputs] for r in outputs],
            }
        )
        with atomic_path(out_dir / f"chunk-{k:05d}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        commits.append(time.perf_counter() - started)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "output_tokens": tokens, "chunk_prompts": chunk, **commit_stats(commits, wall)}


def commit_stats(commits: list[float], wall: float) -> dict[str, Any]:
    """Number of commits and the longest stretch without one (from the start, between commits)."""
    edges = [0.0, *commits]
    gaps = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    return {"commits": len(commits), "max_commit_gap_s": round(max(gaps), 1) if gaps else round(wall, 1)}


class PartWatcher:
    """Notes when each part file of a shard appears (the worker commits them; they are removed at the end)."""

    def __init__(self, parts_dir: Path, t0: float) -> None:
        self.parts_dir, self.t0 = parts_dir, t0
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(0.2):
            with contextlib.suppress(OSError):
                for p in self.parts_dir.glob("part-*.parquet"):
                    self.seen.setdefault(p.name, time.perf_counter() - self.t0)

    def __enter__(self) -> PartWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def way_hpcrollout(engine: Any, args: argparse.Namespace, config: Any) -> dict[str, Any]:
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_shard

    rundir = prepare_run(config)  # the input's max_tokens column gives each prompt its length
    tokenize_before = engine.renderer.tokenize_s
    own_config, engine.config = engine.config, config  # this way's engine.kv_budget
    own_result = engine._result
    finished = FinishTimes()

    def result_and_time(*args: Any) -> Any:
        finished.mark()
        return own_result(*args)

    engine._result = result_and_time
    try:
        started = finished.t0 = time.perf_counter()
        with PartWatcher(rundir.parts_dir(0), started) as watcher:
            result = run_shard(rundir, 0, engine, config)
        wall = time.perf_counter() - started
    finally:
        engine.config = own_config
        engine._result = own_result
    if result.get("state") != "done":
        raise RuntimeError(f"the shard did not finish: {result}")
    return {
        "wall_s": wall,
        "output_tokens": int(result["output_tokens"]),
        "every_seconds": args.every_seconds,
        "kv_budget": config.engine.kv_budget,
        "longest_first": config.engine.longest_first,
        "pacing": config.engine.pacing,
        "admission": engine.admission.describe() if engine.admission is not None else None,
        "finished_at": finished.summary(),
        "tokenize_s": round(engine.renderer.tokenize_s - tokenize_before, 3),
        **commit_stats(sorted(watcher.seen.values()), wall),
    }


def engine_variant(way: str) -> dict[str, Any]:
    """engine.* settings of a way: ``hpcrollout:1.5`` (kv_budget 1.5), ``:none`` (no budget), ``:fifo`` (input
    order), ``:nopace`` (engine.pacing off), ``:pace=0.2`` (engine.pacing 0.2), combined with ``+`` (``hpcrollout:none+fifo``: hand everything over in input order, as before)."""
    _, _, spec = way.partition(":")
    update: dict[str, Any] = {}
    for part in filter(None, spec.lower().split("+")):
        if part in ("none", "null", "off"):
            update["kv_budget"] = None
        elif part == "fifo":
            update["longest_first"] = False
        elif part == "nopace":
            update["pacing"] = None
        elif part.startswith("pace="):
            update["pacing"] = float(part[5:])
        else:
            update["kv_budget"] = float(part)
    return update


class FinishTimes:
    """When each prompt finished, in seconds from the start of a way (raw: through LLM.chat's progress bar hook)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []

    def mark(self, count: int = 1) -> None:
        now = time.perf_counter() - self.t0
        self.times += [now] * count

    def bar(self, *args: Any, **kwargs: Any) -> Any:
        """Stands in for tqdm: LLM.chat wraps its prompt list (returned as is) and its run loop (this object)."""
        if args:
            return args[0]
        self.n, self.format_dict, self.postfix = 0, {"elapsed": 1.0}, ""
        return self

    def update(self, n: int) -> None:
        self.n += n
        self.format_dict["elapsed"] = max(time.perf_counter() - self.t0, 1e-9)
        self.mark(1)  # one call per finished prompt (n = its samples)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def summary(self) -> dict[str, float]:
        t = sorted(self.times)
        if not t:
            return {}
        pick = lambda q: round(t[min(len(t) - 1, int(q * len(t)))], 2)  # noqa: E731
        return {
            "first": round(t[0], 2),
            "p50": pick(0.5),
            "p90": pick(0.9),
            "p99": pick(0.99),
            "second_last": round(t[-2] if len(t) > 1 else t[-1], 2),
            "last": round(t[-1], 2),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.tinymodel import ensure_model_shape

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else work / f"model-{args.shape}"
    ensure_model_shape(model_dir, args.shape)
    if args.cache_root:
        os.environ["VLLM_CACHE_ROOT"] = str(Path(args.cache_root).resolve())
    prompts = make_prompts(args.prompts, args.seed)
    ids = [f"p{i:06d}" for i in range(args.prompts)]
    seeds = [prompt_seed(args.seed, uid) for uid in ids]
    lengths = output_lengths(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    input_path = work / f"prompts-{stamp}.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "max_tokens": lengths}), input_path)

    config = build_config(args, model_dir, work / f"run-{stamp}", input_path)
    engine = VllmEngine(config)
    info = engine.describe()
    log.info("engine: %s", info)
    engine.llm.chat(prompts[:4], params_for(engine, seeds[:4], [16] * 4), use_tqdm=False)  # warm-up, untimed

    results: dict[str, Any] = {}
    try:
        run_ways(args, engine, config, prompts, seeds, lengths, work, stamp, results)
    finally:
        engine.close()  # an engine left running keeps its core process, and this one, from exiting
    return {
        "workload": args.workload,
        "prompts": args.prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "expected_output_tokens": sum(lengths) * args.n,
        "ending": f"stop token ids 0..{args.stop_tokens - 1}" if args.workload == "eos" else "ignore_eos",
        "shape": args.shape,
        "kv_cache_dtype": args.kv_cache_dtype,
        "engine": info,
        "ways": results,
    }


class WayCounters:
    """What the engine did during one way: when the first request reached vLLM, preemptions, tokens generated."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.first_submit = engine, None

    def __enter__(self) -> WayCounters:
        self.t0 = time.perf_counter()
        self.preemptions, self.tokens = self.engine.preemptions, self.engine.generated_tokens
        self.steps = getattr(self.engine, "output_steps", 0)
        core = self.engine.engine
        self.original = core.add_request

        def add_request(*args: Any, **kwargs: Any) -> Any:
            if self.first_submit is None:
                self.first_submit = time.perf_counter() - self.t0
            return self.original(*args, **kwargs)

        core.add_request = add_request
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.engine.add_request  # back to the method
        self.preemptions = self.engine.preemptions - self.preemptions
        self.tokens = self.engine.generated_tokens - self.tokens
        self.steps = getattr(self.engine, "output_steps", 0) - self.steps

    def summary(self) -> dict[str, Any]:
        return {
            "first_submit_s": None if self.first_submit is None else round(self.first_submit, 3),
            "preemptions": self.preemptions,
            "engine_generated_tokens": self.tokens,
            "engine_steps": self.steps,
        }


def run_ways(args, engine, config, prompts, seeds, lengths, work, stamp, results) -> None:  # noqa: ANN001
    """Each way in turn; a way that fails is reported and the others still run."""
    engine._watch_outputs()  # count tokens and preemptions for the raw way too
    for way in args.ways.split(","):
        key = way if way not in results else f"{way}#{sum(k.split('#')[0] == way for k in results) + 1}"
        engine.llm.reset_prefix_cache()  # every way starts with the same (empty) prefix cache
        counters = WayCounters(engine)
        try:
            with counters:
                res = run_way(way, key, args, engine, config, prompts, seeds, lengths, work, stamp)
        except Exception:
            log.exception("way %s failed", key)
            continue
        res.update(counters.summary())
        res["tok_per_s"] = res["output_tokens"] / res["wall_s"]
        results[key] = res
        log.info("%s: %s", key, res)


def run_way(way, key, args, engine, config, prompts, seeds, lengths, work, stamp) -> dict[str, Any]:  # noqa: ANN001
    if way == "raw":
        return way_raw(engine, prompts, seeds, lengths)
    if way.split(":")[0] == "hpcrollout":
        variant = config.model_copy(
            update={
                "run_dir": str(work / f"run-{stamp}-{key.replace(':', '_')}"),
                "engine": config.engine.model_copy(update=engine_variant(way)),
            }
        )
        return way_hpcrollout(engine, args, variant)
    if way == "chunk":
        return way_chunk(engine, prompts, seeds, lengths, args.chunk_prompts, work / f"chunks-{stamp}-{key}")
    raise ValueError(f"--ways: unknown way {way!r} (raw, hpcrollout, chunk)")


def report(summary: dict[str, Any]) -> str:
    eng = summary["engine"]
    lines = [
        f"workload {summary['workload']}: {summary['prompts']} prompts x n={summary['n']}, max_tokens {summary['max_tokens']}"
        f" ({summary['ending']}), {summary['expected_output_tokens']:,} output tokens at most, {summary['shape']} dummy weights,"
        f" kv_cache_dtype {summary['kv_cache_dtype']}, on {eng.get('device', '?')} (vLLM {eng.get('vllm')})",
        f"engine start: {eng['engine_start_s']:.1f} s (compile cache {'warm' if eng['compile_cache'].get('ready_before') else 'cold'}"
        f", {eng['compile_cache'].get('root')})",
        f"{'way':<12}{'wall s':>9}{'tokens':>12}{'tok/s':>10}{'vs raw':>9}  notes",
    ]
    ways = summary["ways"]
    raws = [res["tok_per_s"] for name, res in ways.items() if name.split("#")[0] == "raw"]
    raw = sum(raws) / len(raws) if raws else None  # repeated ways (--ways raw,hpcrollout,raw,...) compare to the mean
    for name, res in ways.items():
        ratio = f"{res['tok_per_s'] / raw:.3f}" if raw else "-"
        notes = []
        if "commits" in res:
            notes.append(f"{res['commits']} commits, max gap {res['max_commit_gap_s']} s")
        if "chunk_prompts" in res:
            notes.append(f"chunks of {res['chunk_prompts']} prompts")
        if "tokenize_s" in res:
            notes.append(f"tokenize {res['tokenize_s']} s")
        if res.get("first_submit_s") is not None:
            notes.append(f"first request to vLLM at {res['first_submit_s']} s")
        if res.get("finished_at"):
            f = res["finished_at"]
            notes.append(
                f"prompts done: first {f['first']} (the least a crash loses), p50 {f['p50']} p90 {f['p90']} "
                f"p99 {f['p99']} s, last two {f['second_last']} {f['last']} s"
            )
        if "preemptions" in res:
            notes.append(f"{res['preemptions']} preemptions")
        if res.get("engine_steps"):
            notes.append(f"{res['engine_steps']:,} steps, {1000 * res['wall_s'] / res['engine_steps']:.1f} ms a step")
        if res.get("admission"):
            adm = res["admission"]
            notes.append(
                f"kv_budget {res['kv_budget']}: peak projected {adm['peak_projected_tokens']:,} of {adm['kv_budget_tokens'] or 0:,}"
                f"; pacing {adm.get('pacing')} (held {adm.get('paced', 0):,} times), {adm.get('steps', 0):,} engine steps"
            )
        lines.append(
            f"{name:<12}{res['wall_s']:>9.1f}{res['output_tokens']:>12,}{res['tok_per_s']:>10.0f}{ratio:>9}  {'; '.join(notes)}"
        )
    if raw:
        for way in dict.fromkeys(name.split("#")[0] for name in ways if name.split("#")[0] != "raw"):
            runs = [res["tok_per_s"] for name, res in ways.items() if name.split("#")[0] == way]
            if runs:
                lines.append(
                    f"{way} / raw (means of {len(runs)} and {len(raws)} runs): {sum(runs) / len(runs) / raw:.3f}"
                )
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=["headline", "variable", "eos"], default="headline")
    parser.add_argument(
        "--ways", default="raw,hpcrollout,chunk", help="comma-separated: raw, hpcrollout[:KV_BUDGET|:none], chunk"
    )
    parser.add_argument("--stop_tokens", type=int, default=200, help="eos: token ids 0..K-1 end a sample")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument(
        "--max_tokens", type=int, default=None, help="headline: every sample's length (2048); variable: the cap (4096)"
    )
    parser.add_argument("--median_tokens", type=float, default=384.0, help="variable: median of the lognormal")
    parser.add_argument("--sigma", type=float, default=1.0, help="variable: sigma of the lognormal (tail weight)")
    parser.add_argument("--chunk_prompts", type=int, default=25, help="chunk way: prompts per chunk (one barrier each)")
    parser.add_argument("--every_seconds", type=float, default=30.0, help="hpcrollout way: checkpoint interval (<= 60)")
    parser.add_argument(
        "--shape", default="qwen3-4b", help="hpcrollout.tinymodel shape (config + tokenizer, dummy weights)"
    )
    parser.add_argument("--model_dir", default=None, help="use this model directory instead of building the shape")
    parser.add_argument("--kv_cache_dtype", default="auto")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    parser.add_argument("--max_model_len", type=int, default=8192)
    parser.add_argument("--max_num_seqs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/hpcrollout-vllm-bench")
    parser.add_argument(
        "--cache_root", default=None, help="VLLM_CACHE_ROOT for the compile cache (shared across calls)"
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")


def main(args: argparse.Namespace) -> int:
    if args.max_tokens is None:
        args.max_tokens = 2048 if args.workload == "headline" else 4096
    summary = run(args)
    text = report(summary)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "report": text}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(
        prog="python -m hpcrollout.benchmarks.vllm_throughput", description=__doc__.split("\n\n")[0]
    )
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
