"""How many decode steps a workload needs under each admission rule, against a lower bound no rule can beat.

A CPU model of vLLM's KV cache (blocks of 16 tokens, every running sample grows one token a step, the n
samples of a prompt share its full prompt blocks) run for three schedules of the same prompts:

  raw         everything handed to the engine at once, vLLM's way: a waiting sample starts when its prompt's
              blocks fit, and when the cache runs out the newest running sample is preempted and later
              recomputed from scratch (its tokens generated again)
  hpcrollout  ``engines/admission.py`` itself (the projected-peak rule, ``kv_budget`` 1.0, and the default
              ``engine.pacing``) deciding when each prompt is handed over; the engine then never preempts
              with known lengths; ``hpcr:nopace`` the same without pacing (the greedy peak rule)
  bound       a lower bound on the steps of *any* schedule that never preempts (below)

With ignore_eos every sample runs exactly L = max_tokens steps. The bound is the largest of: L; the
token-steps the samples need over the cache size, W / C; and, when the whole workload needs more than one
cache (N samples, mean prompt P), 2L + P - 1 - C / N: if a schedule ended before step 2L, every sample would
have started by step T - L < L and be running at step L - 1, holding P_i + L - 1 - a_i tokens, and their sum
must fit in C. For the seed's headline workload this says what admission can win at most: the steps saved
by the best schedule, each step costing the model's weights and the fixed per-step work (the KV bytes read
are the same whatever the schedule: every token reads its whole context once).

    python -m hpcrollout.benchmarks.admission_bound                       # headline shape on an H200
    python -m hpcrollout.benchmarks.admission_bound --prompts 400 --capacity 850352 --max_tokens 1024
    python -m hpcrollout.benchmarks.admission_bound --prompts 400 --max_tokens 4096 --median_tokens 384  # long tail

With per-prompt lengths (``--median_tokens``: lognormal, as the throughput benchmark's ``variable`` workload
draws them) the bound is the longest sample or the token-steps over the cache, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np

from hpcrollout.engines.admission import Admission
from hpcrollout.engines.vllm_engine import _AUTO_PACING

BLOCK = 16


def blocks(tokens: int) -> int:
    return -(-tokens // BLOCK) * BLOCK


def prompt_lengths(count: int, seed: int, low: int, high: int) -> list[int]:
    """Prompt token counts drawn uniformly in [low, high] (the throughput benchmark's 30..300-word prompts are
    about 50..420 tokens after the chat template)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(low, high + 1, size=count)]


def simulate_raw(prompts: list[int], n: int, length: int | list[int], capacity: int, max_seqs: int) -> dict[str, Any]:
    """vLLM's own scheduling of everything at once: FIFO start when the prompt fits, preempt the newest."""
    lengths = [length] * len(prompts) if isinstance(length, int) else length
    waiting = [[p, 0, lengths[i]] for i, p in enumerate(prompts) for _ in range(n)]  # [prompt, generated, length]
    running: list[list[int]] = []
    steps = preemptions = redone = 0
    used = 0
    batch_sum = 0
    while waiting or running:
        steps += 1
        while waiting and len(running) < max_seqs and used + blocks(waiting[0][0] + waiting[0][1]) <= capacity:
            seq = waiting.pop(0)
            used += blocks(seq[0] + seq[1])
            running.append(seq)
        batch_sum += len(running)
        for seq in list(running):
            if seq not in running:  # preempted earlier in this step
                continue
            grown = blocks(seq[0] + seq[1] + 1) - blocks(seq[0] + seq[1])
            while used + grown > capacity and seq in running:  # out of blocks: preempt the newest (maybe itself)
                victim = running.pop()
                used -= blocks(victim[0] + victim[1])
                redone += victim[1]
                victim[1] = 0  # recomputed from scratch
                waiting.insert(0, victim)
                preemptions += 1
            if seq not in running:
                continue
            seq[1] += 1
            used += grown
            if seq[1] >= seq[2]:
                running.remove(seq)
                used -= blocks(seq[0] + seq[1])
    return {"steps": steps, "mean_batch": batch_sum / steps, "preemptions": preemptions, "tokens_redone": redone}


def simulate_hpcrollout(
    prompts: list[int], n: int, length: int | list[int], capacity: int, max_seqs: int, pacing: float | None = None
) -> dict[str, Any]:
    """The real Admission deciding when each prompt is handed over; the engine runs what it was given."""
    adm = Admission(
        capacity_tokens=capacity,
        fraction=1.0,
        n=n,
        ignore_eos=True,
        block_size=BLOCK,
        prefix_caching=False,
        max_seqs=max_seqs,
        pacing=pacing,
    )
    adm.rebuild_s = 0.0  # rebuild the projection on every check: the model has no wall clock
    lengths = [length] * len(prompts) if isinstance(length, int) else length  # per prompt (max_tokens_column)
    for i, p in enumerate(prompts):
        adm.add(i, p, lengths[i])
    adm.input_done = True
    flights: dict[int, int] = {}  # flight key -> steps left
    steps = batch_sum = peak = 0
    first_done = None
    while adm.waiting or flights:
        while (taken := adm.take()) is not None:
            flights[taken[1]] = lengths[taken[0]]  # steps left
        steps += 1
        batch_sum += n * len(flights)
        peak = max(peak, adm.reserved)
        adm.tick()
        adm.stepped()
        for key in list(flights):
            flights[key] -= 1
            if flights[key] <= 0:
                del flights[key]
                adm.done(key)
                first_done = first_done or steps
    return {
        "steps": steps,
        "mean_batch": batch_sum / steps,
        "preemptions": 0,
        "peak_projected": adm.peak_projected,
        "first_done": first_done,
    }


def lower_bound(prompts: list[int], n: int, length: int | list[int], capacity: int) -> dict[str, Any]:
    if not isinstance(length, int):  # per-prompt lengths: the longest sample, and the token-steps over the cache
        work = n * sum(p * L + L * (L + 1) / 2 for p, L in zip(prompts, length))
        parts = {"one sample": max(length), "work / cache": math.ceil(work / capacity)}
        return {"steps": max(parts.values()), "parts": parts}
    samples = n * len(prompts)
    mean_prompt = sum(prompts) / len(prompts)
    work = n * sum(p * length + length * (length + 1) / 2 for p in prompts)  # token-steps of KV held
    parts = {"one sample": length, "work / cache": math.ceil(work / capacity)}
    if work / capacity > length:
        parts["two-wave argument"] = math.ceil(min(2 * length, 2 * length + mean_prompt - 1 - capacity / samples))
    return {"steps": max(parts.values()), "parts": parts}


def lognormal_lengths(count: int, seed: int, median: float, sigma: float, cap: int) -> list[int]:
    """Per-prompt max_tokens as the throughput benchmark's ``variable`` workload draws them (same seed rule)."""
    rng = np.random.default_rng(seed + 1)
    draws = np.exp(rng.normal(np.log(median), sigma, size=count))
    return [int(x) for x in np.clip(np.round(draws), 16, cap)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=2048)
    parser.add_argument("--capacity", type=int, default=850_352, help="KV cache tokens (the H200 bf16 figure)")
    parser.add_argument("--max_num_seqs", type=int, default=1024)
    parser.add_argument("--prompt_tokens", type=int, nargs=2, default=[50, 420], metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--median_tokens", type=float, default=None, help="per-prompt lengths: lognormal with this median, capped at max_tokens"
    )
    parser.add_argument("--sigma", type=float, default=1.0, help="the lognormal's sigma (tail weight)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prompts = prompt_lengths(args.prompts, args.seed, *args.prompt_tokens)
    length: int | list[int] = args.max_tokens
    if args.median_tokens:
        length = lognormal_lengths(args.prompts, args.seed, args.median_tokens, args.sigma, args.max_tokens)
    shape = (prompts, args.n, length, args.capacity)
    started = time.monotonic()
    ways = {
        "raw": simulate_raw(*shape, args.max_num_seqs),
        "hpcrollout": simulate_hpcrollout(
            *shape, args.max_num_seqs, pacing=_AUTO_PACING if isinstance(length, int) else None
        ),  # pacing auto: on only for equal known lengths (vllm_engine)
        "hpcr:nopace": simulate_hpcrollout(*shape, args.max_num_seqs),
        "bound": lower_bound(*shape),
    }
    tokens = f"{args.max_tokens}" if isinstance(length, int) else f"lognormal(median {args.median_tokens:g}, sigma {args.sigma:g}, cap {args.max_tokens})"
    print(
        f"{args.prompts} prompts x n={args.n} x {tokens} tokens (ignore_eos), cache {args.capacity:,} tokens, "
        f"max_num_seqs {args.max_num_seqs} ({time.monotonic() - started:.1f} s to simulate)"
    )
    for way, r in ways.items():
        extra = ", ".join(
            f"{k} {v:,.0f}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r.items() if k != "steps"
        )
        print(f"{way:<11} {r['steps']:>7,} steps  ({extra})")
    print(
        f"hpcrollout / bound: {ways['hpcrollout']['steps'] / ways['bound']['steps']:.3f} in steps; "
        f"raw / hpcrollout: {ways['raw']['steps'] / ways['hpcrollout']['steps']:.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **ways}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
