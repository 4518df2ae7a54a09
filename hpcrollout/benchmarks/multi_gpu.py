"""Two GPUs of one host: 2 engines x TP=1 vs 1 engine x TP=2 vs raw ``LLM.chat`` with TP=2, per GPU, in one call.

The long-tailed workload of vllm_throughput.py (``variable``: per-prompt max_tokens from a lognormal; its prompts,
lengths and model shape, Qwen3-4B with dummy weights; the cap 2048 here by default, so that it fits one call),
every way a fresh process, in the order given:
  2x1      ``hpcrollout run`` with ``executor.engines_per_task: 2`` and TP=1: one engine per GPU, both starting at
           once on one compile cache (the first call's cache is empty: one compiles under the lock, the other
           waits and loads: the compile-cache figure)
  1x2      ``hpcrollout run`` with one engine, ``engine.tensor_parallel_size: 2``
  raw-tp2  a plain script: ``LLM(tensor_parallel_size=2)``, one ``llm.chat`` on every prompt with the same
           per-prompt seeds and max_tokens (end_to_end.py's way of running a script)
Per GPU, so the ways compare: generation tok/s per GPU-second (``busy``: each engine's first shard start to
its last shard's end, times its GPUs; the raw script's ``llm.chat``), the same over the time the task held
both GPUs (``held``: first start to last end, x 2), and whole-process tok/s per GPU (``wall``). Engine start
TP=2 vs TP=1, cold (compiled) and warm (cache ready; the lock wait not counted), from the runs' own records.
One compile cache for the call (``--cache_root``, default a fresh WORK/cache-STAMP). Each way has what is left
of ``--deadline_s``; the JSON (``--out``) is rewritten after every way, so a call cut short keeps what ran.

    python -m hpcrollout.benchmarks.multi_gpu --prompts 100 --ways 2x1,1x2,raw-tp2 --out multi_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

WAYS = ("2x1", "1x2", "raw-tp2")

SCRIPT = r"""
import json, sys, time
t0 = time.time()
import pyarrow.parquet as pq
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
t_import = time.time()
t = pq.read_table(a["input"]).to_pydict()
llm = LLM(model=a["model"], load_format="dummy", max_model_len=a["max_model_len"], tensor_parallel_size=a["tp"],
          gpu_memory_utilization=a["gpu_memory_utilization"], seed=0)
t_engine = time.time()
params = [SamplingParams(n=a["n"], max_tokens=m, temperature=1.0, ignore_eos=True, seed=s)
          for m, s in zip(t["max_tokens"], a["seeds"])]
outputs = llm.chat([list(p) for p in t["prompt"]], params, use_tqdm=False)
t_gen = time.time()
tokens = sum(len(o.token_ids) for r in outputs for o in r.outputs)
print("RESULT " + json.dumps({"import_s": t_import - t0, "engine_start_s": t_engine - t_import,
      "generation_s": t_gen - t_engine, "output_tokens": tokens}), flush=True)
"""


def parse_ways(text: str) -> list[str]:
    ways = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS]
    if bad or not ways:
        raise SystemExit(f"--ways: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(WAYS)}")
    return ways


def workload(args: argparse.Namespace) -> tuple[list[str], list[Any], list[int], list[int]]:
    """vllm_throughput.py's variable workload: ids, chat prompts, per-prompt max_tokens and seeds."""
    from hpcrollout.benchmarks.vllm_throughput import make_prompts, output_lengths
    from hpcrollout.engines.base import prompt_seed

    ids = [f"p{i:06d}" for i in range(args.prompts)]
    lengths = output_lengths(argparse.Namespace(workload="variable", **vars(args)))
    return ids, make_prompts(args.prompts, args.seed), lengths, [prompt_seed(args.seed, uid) for uid in ids]


def hpcrollout_command(
    args: argparse.Namespace, way: str, model: Path, inp: Path, out: Path, run_dir: Path
) -> list[str]:
    engines, tp = (2, 1) if way == "2x1" else (1, 2)
    return [
        sys.executable, "-m", "hpcrollout", "run",
        "--model_path", str(model), "--input", str(inp), "--output", str(out), "--run_dir", str(run_dir),
        "--n_samples", str(args.n), "--max_tokens", str(args.max_tokens), "--temperature", "1.0",
        "--seed", str(args.seed), "--max_model_len", str(args.max_model_len),
        "--gpu_memory_utilization", str(args.gpu_memory_utilization), "--tensor_parallel_size", str(tp),
        "--set", "engine.load_format=dummy", "--set", "sampling.ignore_eos=true", "--set", "data.id_column=id",
        "--set", "data.max_tokens_column=max_tokens", "--set", f"sharding.num_shards={args.shards}",
        "--set", f"executor.engines_per_task={engines}", "--set", f"checkpoint.every_seconds={args.every_seconds}",
    ]  # fmt: skip


def script_command(args: argparse.Namespace, model: Path, inp: Path, seeds: list[int]) -> list[str]:
    spec = {
        "input": str(inp), "model": str(model), "max_model_len": args.max_model_len, "tp": 2,
        "gpu_memory_utilization": args.gpu_memory_utilization, "n": args.n, "seeds": seeds,
    }  # fmt: skip
    return [sys.executable, "-c", SCRIPT, json.dumps(spec)]


def engines_of(markers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per engine process (pid) of a run, from its done markers: start, compile cache, generation window, tokens."""
    by_pid: dict[Any, list[dict[str, Any]]] = {}
    for m in markers:
        by_pid.setdefault(m.get("pid"), []).append(m)
    out = []
    for ms in by_pid.values():
        eng = ms[0].get("engine", {})
        cache = eng.get("compile_cache", {})
        out.append({
            "engine_index": ms[0].get("engine_index"), "gpus": ms[0].get("gpus"),
            "tensor_parallel_size": eng.get("tensor_parallel_size"), "engine_start_s": eng.get("engine_start_s"),
            "compiled": not cache.get("ready_before", False), "lock_wait_s": cache.get("waited_s", 0.0),
            "first_start": min(m.get("started", m["finished"]) for m in ms), "last_end": max(m["finished"] for m in ms),
            "shards": sorted(m["shard"] for m in ms), "output_tokens": sum(m.get("output_tokens", 0) for m in ms),
        })  # fmt: skip
    return sorted(out, key=lambda e: (e["engine_index"] is None, e["engine_index"] or 0))


def per_gpu(tokens: int, wall: float, engines: list[dict[str, Any]], gpus: int) -> dict[str, Any]:
    """tok/s per GPU: busy (each engine's window x its GPUs), held (first start to last end x all GPUs), wall."""
    busy = sum((e["last_end"] - e["first_start"]) * max(1, e.get("tensor_parallel_size") or 1) for e in engines)
    held = (max(e["last_end"] for e in engines) - min(e["first_start"] for e in engines)) * gpus if engines else 0
    return {
        "busy_tok_s_per_gpu": tokens / busy if busy else None,
        "held_tok_s_per_gpu": tokens / held if held else None,
        "wall_tok_s_per_gpu": tokens / wall / gpus,
    }


def run_way(way: str, args: argparse.Namespace, model: Path, inp: Path, seeds: list[int], env: dict[str, str],
            work: Path, tag: str, timeout: float) -> dict[str, Any]:  # fmt: skip
    log_path = work / f"{tag}.log"
    if way == "raw-tp2":
        cmd = script_command(args, model, inp, seeds)
    else:
        cmd = hpcrollout_command(args, way, model, inp, work / f"{tag}.parquet", work / f"{tag}.run")
    started = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        finally:  # a way cut short, or one that left vLLM processes behind, must not hold the GPUs of the next
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{way} failed (exit {proc.returncode}); see {log_path}")
    if way == "raw-tp2":
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
        res = json.loads(line[len("RESULT ") :])
        gen = res["generation_s"]
        res.update(wall_s=wall, engines=[{"tensor_parallel_size": 2, "engine_start_s": res["engine_start_s"],
                                          "compiled": None, "lock_wait_s": 0.0}])  # fmt: skip
        res.update(busy_tok_s_per_gpu=res["output_tokens"] / gen / 2, held_tok_s_per_gpu=res["output_tokens"] / gen / 2,
                   wall_tok_s_per_gpu=res["output_tokens"] / wall / 2)  # fmt: skip
        return res
    markers = [json.loads(p.read_text()) for p in sorted((work / f"{tag}.run" / "done").glob("*.json"))]
    engines = engines_of(markers)
    tokens = sum(m.get("output_tokens", 0) for m in markers)
    return {"wall_s": wall, "output_tokens": tokens, "engines": engines, **per_gpu(tokens, wall, engines, 2),
            "timings": next((x for x in stdout.splitlines() if x.startswith("took ")), "")}  # fmt: skip


def start_figures(ways: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Engine start TP=2 vs TP=1 (cold: compiled; warm: cache ready, lock wait not counted), and the compile-cache
    figure of two engines starting at once (the first 2x1 way whose engines one compiled and one waited)."""
    starts: dict[str, list[float]] = {}
    cache: dict[str, Any] = {}
    tp2_started, tp2_before_script = False, []
    for name, res in ways.items():  # in the order they ran
        for e in res.get("engines", []):
            if e.get("engine_start_s") is None:
                continue
            tp = e.get("tensor_parallel_size") or 1
            state = {True: "cold", False: "warm", None: "script"}[e.get("compiled")]
            starts.setdefault(f"tp{tp}-{state}", []).append(round(e["engine_start_s"], 1))
            if state == "script" and tp2_started:
                tp2_before_script.append(round(e["engine_start_s"], 1))
            tp2_started = tp2_started or tp == 2
        engines = res.get("engines", [])
        if (
            not cache
            and name.startswith("2x1")
            and len(engines) == 2
            and sum(bool(e["compiled"]) for e in engines) == 1
        ):
            first = next(e for e in engines if e["compiled"])
            second = next(e for e in engines if not e["compiled"])
            cache = {"way": name, "first_start_s": first["engine_start_s"], "second_start_s": second["engine_start_s"],
                     "second_waited_for_lock_s": second["lock_wait_s"]}  # fmt: skip
    mean = lambda key: sum(starts[key]) / len(starts[key]) if starts.get(key) else None  # noqa: E731
    ratios: dict[str, Any] = {"warm_tp2_from": "hpcrollout"}
    if not starts.get("tp2-warm") and tp2_before_script:
        # the raw script started after a TP=2 engine of this call had filled the cache: its LLM() is a warm start
        starts["tp2-warm"], ratios["warm_tp2_from"] = tp2_before_script, "raw-tp2 (vLLM's LLM() alone)"
    for state in ("cold", "warm"):
        a, b = mean(f"tp2-{state}"), mean(f"tp1-{state}")
        ratios[f"tp2_over_tp1_{state}"] = a / b if a and b else None
    return {"starts_s": starts, **ratios, "compile_cache": cache or None}


def report(summary: dict[str, Any]) -> str:
    w = summary["workload"]
    lines = [
        f"multi-gpu: variable workload, {w['prompts']} prompts x n={w['n']}, max_tokens lognormal median "
        f"{w['median_tokens']:g} sigma {w['sigma']:g} cap {w['max_tokens']} ({w['expected_output_tokens']:,} tokens), "
        f"{w['shape']} dummy weights, {w['shards']} shards, 2 GPUs, one compile cache ({summary['cache_root']})",
        f"{'way':<10}{'wall s':>8}{'tokens':>12}{'busy/GPU':>10}{'held/GPU':>10}{'wall/GPU':>10}"
        f"{'vs raw':>8}{'vs 1x2':>8}  engines",
    ]
    ways = summary["ways"]
    ref = {k: next((r.get("busy_tok_s_per_gpu") for n, r in ways.items() if n.split("#")[0] == k and "error" not in r), None)
           for k in ("raw-tp2", "1x2")}  # fmt: skip
    fmt = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
    for name, r in ways.items():
        if "error" in r:
            lines.append(f"{name:<10}  not measured: {r['error']}")
            continue
        busy = r["busy_tok_s_per_gpu"]
        ratio = lambda k, busy=busy: f"{busy / ref[k]:.3f}" if ref[k] and busy else "-"  # noqa: E731
        engines = "; ".join(
            f"e{e.get('engine_index') or 0} TP{e.get('tensor_parallel_size')}"
            f" start {e['engine_start_s']:.1f} s"
            + ({True: " (compiled)", False: " (from the cache)", None: ""}[e.get("compiled")])
            + (f" after {e['lock_wait_s']:.1f} s lock wait" if e.get("lock_wait_s") else "")
            + (f", shards {e['shards']}" if "shards" in e else "")
            for e in r.get("engines", [])
        )
        lines.append(
            f"{name:<10}{r['wall_s']:>8.1f}{r['output_tokens']:>12,}{fmt(r['busy_tok_s_per_gpu']):>10}"
            f"{fmt(r['held_tok_s_per_gpu']):>10}{fmt(r['wall_tok_s_per_gpu']):>10}{ratio('raw-tp2'):>8}"
            f"{ratio('1x2'):>8}  {engines}"
        )
    s = summary["starts"]
    two = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines.append(f"engine start s: {json.dumps(s['starts_s'])}; TP=2 / TP=1 cold {two(s['tp2_over_tp1_cold'])},"
                 f" warm {two(s['tp2_over_tp1_warm'])} (warm TP=2 from {s['warm_tp2_from']})")  # fmt: skip
    c = s["compile_cache"]
    lines.append(
        "compile cache, two engines starting at once: "
        + (
            f"first {c['first_start_s']:.1f} s (compiled), second {c['second_start_s']:.1f} s after waiting "
            f"{c['second_waited_for_lock_s']:.1f} s on the lock ({c['way']})"
            if c
            else "not measured (no 2x1 way on an empty cache)"
        )  # fmt: skip
    )
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ways", default="2x1,1x2,raw-tp2", help=f"comma-separated, in order: {', '.join(WAYS)}")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument(
        "--max_tokens", type=int, default=2048,
        help="the cap of the lognormal lengths (vllm_throughput.py: 4096; 2048 keeps three fresh processes in one call)",
    )  # fmt: skip
    parser.add_argument("--median_tokens", type=float, default=384.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=8, help="hpcrollout ways: sharding.num_shards")
    parser.add_argument("--every_seconds", type=float, default=30.0, help="hpcrollout ways: checkpoint interval")
    parser.add_argument("--shape", default="qwen3-4b", help="hpcrollout.tinymodel shape (dummy weights)")
    parser.add_argument("--max_model_len", type=int, default=8192)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/hpcrollout-multi-gpu-bench")
    parser.add_argument("--cache_root", default=None, help="VLLM_CACHE_ROOT of every process (default: a fresh one)")
    parser.add_argument("--deadline_s", type=float, default=540.0, help="the whole call; a way gets what is left")
    parser.add_argument("--out", default=None, help="write the figures as JSON here (after every way)")


def main(args: argparse.Namespace) -> int:
    from hpcrollout.tinymodel import ensure_model_shape

    began = time.monotonic()
    ways = parse_ways(args.ways)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-{args.shape}"
    ensure_model_shape(model, args.shape)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ids, prompts, lengths, seeds = workload(args)
    inp = work / f"prompts-{stamp}.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "max_tokens": lengths}), inp)
    cache = Path(args.cache_root or work / f"cache-{stamp}").resolve()
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache)}
    summary: dict[str, Any] = {
        "workload": {
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "shards": args.shards,
            "median_tokens": args.median_tokens,
            "sigma": args.sigma,
            "shape": args.shape,
            "expected_output_tokens": sum(lengths) * args.n,
        },  # fmt: skip
        "cache_root": str(cache),
        "ways": {},
    }
    for i, way in enumerate(ways):
        key = way if way not in summary["ways"] else f"{way}#{i + 1}"
        left = args.deadline_s - (time.monotonic() - began)
        if left < 60:
            summary["ways"][key] = {"error": f"skipped: {left:.0f} s of --deadline_s left"}
        else:
            try:
                res = run_way(way, args, model, inp, seeds, env, work, f"{stamp}-{i}-{way}", left - 10)
            except (RuntimeError, subprocess.TimeoutExpired, StopIteration) as exc:
                res = {"error": str(exc)[:300]}
            summary["ways"][key] = res
            print(f"{key}: {json.dumps(res, default=str)}", file=sys.stderr, flush=True)
        summary["starts"] = start_figures({k: v for k, v in summary["ways"].items() if "error" not in v})
        text = report(summary)
        if args.out:
            Path(args.out).write_text(json.dumps({**summary, "report": text}, indent=2, default=str) + "\n")
    print(text)
    return 0 if all("error" not in r for r in summary["ways"].values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m hpcrollout.benchmarks.multi_gpu", description=__doc__.split("\n\n")[0]
    )
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
