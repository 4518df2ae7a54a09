"""Scoring at scale: responses scored per second and peak memory (RSS of the whole process tree) of hpcrollout score.

Generates a synthetic merged file of math-style responses (a few sentences of reasoning, then a final answer in
``\\boxed{}`` or "The answer is ...": integers, fractions, decimals, about a third of them wrong, a few with no
answer) with a reference column, then runs ``hpcrollout score`` on it in a subprocess and samples the RSS of that
process and all its children (the verifier workers) every 0.1 s. Each verifier named runs on the same file;
with several row counts (``--rows 100000,1000000``) the peak RSS at each shows whether memory grows with rows.

    python -m hpcrollout.benchmarks.scoring --rows 100000,1000000 --n 1 --verifiers exact --workdir /tmp/sb
    python -m hpcrollout.benchmarks.scoring --rows 100000 --n 1 --verifiers math
    python -m hpcrollout.benchmarks.scoring --rows 20000 --n 4                          # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

FILLER = (
    "First we simplify the expression step by step. Multiplying both sides by the denominator gives a linear "
    "equation, and collecting the terms we find the value. Checking the result against the original condition "
    "confirms it. "
)


def _answer(rng: np.random.Generator, i: int) -> tuple[str, str, str]:
    """(reference, a correct written form, a wrong written form) for row i."""
    kind = i % 3
    if kind == 0:
        a = int(rng.integers(1, 10**6))
        return str(a), str(a), str(a + int(rng.integers(1, 9)))
    if kind == 1:
        a, b = int(rng.integers(1, 1000)), int(rng.integers(2, 1000))
        return f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
    a = int(rng.integers(1, 10**4))
    return f"{a / 8}", f"\\frac{{{a}}}{{8}}", f"{a / 8 + 0.5}"


def write_input(path: Path, rows: int, n: int, seed: int = 0, group: int = 8192) -> int:
    """The synthetic merged file; returns the number of responses."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [
            ("uid", pa.string()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("error", pa.string()),
        ]
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, group):
            uids, prompts, refs, responses = [], [], [], []
            for i in range(start, min(rows, start + group)):
                ref, right, wrong = _answer(rng, i)
                out = []
                for k in range(n):
                    roll = rng.random()
                    body = FILLER * int(1 + (i + k) % 3)
                    if roll < 0.03:
                        out.append(body + "I could not finish.")
                    elif roll < 0.35:
                        out.append(body + f"The answer is ${wrong}$.")
                    else:
                        out.append(body + f"So the final answer is \\boxed{{{right}}}.")
                uids.append(f"p{i}")
                prompts.append(f"Problem {i}: compute the value.")
                refs.append(ref)
                responses.append(out)
            writer.write_table(
                pa.table(
                    {
                        "uid": uids,
                        "prompt": prompts,
                        "answer": refs,
                        "responses": responses,
                        "error": [None] * len(uids),
                    },
                    schema=schema,
                )
            )
    return rows * n


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; (wall seconds, peak RSS MiB of it and its children summed, stdout)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return time.monotonic() - started, peak / 2**20, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000", help="rows of the input; a comma-separated list runs each")
    parser.add_argument("--n", type=int, default=1, help="responses per row")
    parser.add_argument("--verifiers", default="math,exact", help="comma-separated --verifier values")
    parser.add_argument("--workers", type=int, default=None, help="--workers of hpcrollout score (default: its own)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="hpcrollout-scoring-"))
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{psutil.virtual_memory().total / 2**30:,.0f} GiB RAM, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} before the runs"
    )
    for rows in [int(r) for r in args.rows.split(",") if r]:
        inp = base / f"merged-{rows}.parquet"
        t = time.monotonic()
        responses = write_input(inp, rows, args.n)
        print(
            f"input: {rows:,} rows x n={args.n} = {responses:,} responses, {inp.stat().st_size / 2**20:,.0f} MiB "
            f"(written in {time.monotonic() - t:,.0f} s)"
        )
        run_verifiers(inp, args.verifiers, args.workers, base)
        inp.unlink()
    if not args.keep and args.workdir is None:
        shutil.rmtree(base)
    return 0


def run_verifiers(inp: Path, verifiers: str, workers: int | None, base: Path) -> None:
    for verifier in [v for v in verifiers.split(",") if v]:
        out = base / f"scored-{verifier.replace(':', '_')}.parquet"
        cmd = [sys.executable, "-m", "hpcrollout", "score", str(inp), "-o", str(out), "--verifier", verifier, "--json"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        wall, peak, stdout = run_measured(cmd)
        report = json.loads(stdout)
        print(
            f"{verifier:>8}: {report['responses']:,} responses in {wall:,.1f} s wall = "
            f"{report['responses'] / wall:,.0f} "
            f"responses/s (scoring loop {report['responses_per_s']:,.0f}/s); peak RSS of the process tree "
            f"{peak:,.0f} MiB; mean score {report['mean_score']}; outcomes {report['statuses']}"
        )
        out.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
