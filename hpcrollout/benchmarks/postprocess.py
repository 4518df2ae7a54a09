"""Post-processing at scale: peak RSS of flatten/analyze/filter on a large merged file, and speed vs pandas.

Generates a synthetic merged file (n responses per row, short responses, a few error rows), then runs each
command in its own subprocess and reads that child's peak RSS from ``os.wait4``. The speed comparison runs our
command and the straightforward pandas version (read the whole file, explode, compute / write) side by side on
the same file in the same run and prints the ratio.

    python -m hpcrollout.benchmarks.postprocess --rows 10000000 --speed_rows 1000000 --workdir /tmp/pp
    python -m hpcrollout.benchmarks.postprocess --rows 200000 --speed_rows 100000   # quick
"""

from __future__ import annotations

import argparse
import contextlib
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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.schema import RESULT_FIELDS

_WORD_TEXT = (
    "the a of to and in is it that for on with as was be at by this an are or from not but have they which one you "
    "all were her she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three café naïve 日本語 数学 Ωmega résumé 🙂"
)
WORDS = _WORD_TEXT.split()
MAX_TOKENS = 64


def _response_pool(rng: np.random.Generator, size: int) -> tuple[pa.Array, np.ndarray]:
    """Short responses (0..~60 words) and their token counts; responses at the cap finish by length."""
    texts, tokens = [], []
    for i in range(size):
        if i % 97 == 0:
            texts.append("")
            tokens.append(1)
            continue
        k = int(rng.integers(1, 56))
        texts.append(" ".join(rng.choice(WORDS, size=k)))
        tokens.append(min(MAX_TOKENS, int(k * 1.3) + 1))
    return pa.array(texts, pa.string()), np.asarray(tokens, dtype=np.int32)


def merged_chunk(
    rng: np.random.Generator,
    start: int,
    rows: int,
    n: int,
    pool: pa.Array,
    pool_tokens: np.ndarray,
    prompts: pa.Array,
    error_rate: float = 0.001,
) -> pa.Table:
    """``rows`` synthetic merged rows starting at global row ``start`` (vectorised; no per-row Python)."""
    err = rng.random(rows) < error_rate
    lengths = np.where(err, 0, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    idx = rng.integers(0, len(pool), size=total)
    # About 15% of samples repeat the prompt's first sample, so per-prompt diversity is not trivially n/n.
    first = np.repeat(offsets[:-1], lengths)
    dup = rng.random(total) < 0.15
    idx = np.where(dup, idx[first], idx)
    tok = pool_tokens[idx]
    sample = np.arange(total) - first
    # A per-sample number makes each text unique (as real responses are), so Parquet cannot dictionary-encode
    # the pool away; a duplicate repeats its prompt's first sample, number included.
    serial = np.where(dup, first, np.arange(total)) + int(start) * n
    row_ids = np.arange(start, start + rows, dtype=np.int64)
    seeds = np.repeat(row_ids * 1000, lengths) + sample

    def lst(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), values)

    prompt_idx = pa.array(rng.integers(0, len(prompts), size=rows))
    content = prompts.take(prompt_idx)
    msgs = pa.StructArray.from_arrays([pa.array(["user"] * rows, pa.string()), content], names=["role", "content"])
    prompt = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), msgs)
    uid = pc.binary_join_element_wise("u", pc.cast(pa.array(row_ids), pa.string()), "")
    finish = np.where(tok >= MAX_TOKENS, "length", "stop")
    errors = pa.array(
        np.where(err, "prompt has 1,200,000 characters, more than data.max_prompt_chars", None), pa.string()
    )
    cols = {
        "id": pa.array(row_ids),
        "prompt": prompt,
        "uid": uid,
        "responses": lst(
            pc.binary_join_element_wise(pool.take(pa.array(idx)), pc.cast(pa.array(serial), pa.string()), " #")
        ),
        "response_tokens": lst(pa.array(tok, pa.int32())),
        "finish_reasons": lst(pa.array(finish, pa.string())),
        "stop_reasons": lst(pa.nulls(total, pa.string())),
        "sample_seeds": lst(pa.array(seeds, pa.int64())),
        "prompt_tokens": pa.array(rng.integers(8, 200, size=rows).astype(np.int32)),
        "error": errors,
    }
    fields = [pa.field("id", pa.int64()), pa.field("prompt", prompt.type), *RESULT_FIELDS]
    return pa.table(cols, schema=pa.schema(fields))


def generate_merged(path: Path, rows: int, n: int = 4, seed: int = 0, row_group_rows: int = 65_536) -> Path:
    """Write a synthetic merged file of ``rows`` rows, one row group per ``row_group_rows``."""
    rng = np.random.default_rng(seed)
    pool, pool_tokens = _response_pool(rng, 5000)
    prompts = pa.array([f"Question {i}: explain {' '.join(rng.choice(WORDS, size=8))}?" for i in range(2000)])
    writer = None
    try:
        for start in range(0, max(rows, 1), row_group_rows):
            chunk = merged_chunk(rng, start, min(row_group_rows, rows - start), n, pool, pool_tokens, prompts)
            if writer is None:
                writer = pq.ParquetWriter(path, chunk.schema, compression="zstd")
            writer.write_table(chunk, row_group_size=row_group_rows)
    finally:
        if writer is not None:
            writer.close()
    return path


# ---- the straightforward pandas versions (whole file in memory) ----

SAMPLE_LISTS = ["responses", "response_tokens", "finish_reasons", "stop_reasons", "sample_seeds"]


def pandas_flatten(inp: str, out: str) -> None:
    import pandas as pd

    df = pd.read_parquet(inp)
    df = df.explode(SAMPLE_LISTS, ignore_index=True)
    df["sample_index"] = df.groupby("uid").cumcount()
    df.to_parquet(out)


def pandas_analyze(inp: str, out: str) -> None:
    import pandas as pd

    df = pd.read_parquet(inp).explode(SAMPLE_LISTS, ignore_index=True)
    ok = df["responses"].notna()
    chars = df.loc[ok, "responses"].str.len()
    tokens = df.loc[ok, "response_tokens"].astype("int64")
    stats = {
        "rows": int(df["uid"].nunique()),
        "responses": int(ok.sum()),
        "chars": chars.quantile([0.5, 0.9, 0.99]).tolist() + [chars.min(), chars.mean(), chars.max()],
        "tokens": tokens.quantile([0.5, 0.9, 0.99]).tolist() + [tokens.min(), tokens.mean(), tokens.max()],
        "finish": df["finish_reasons"].value_counts().to_dict(),
        "empty": int((df.loc[ok, "responses"].str.strip() == "").sum()),
        "duplicates": int(df[ok].duplicated(["uid", "responses"]).sum()),
        "diversity": df[ok].groupby("uid")["responses"].nunique().value_counts().to_dict(),
        "errors": int(df.drop_duplicates("uid")["error"].notna().sum()),
    }
    Path(out).write_text(json.dumps(stats, default=str))


def pandas_filter(inp: str, out: str) -> None:
    import pandas as pd

    df = pd.read_parquet(inp).explode(SAMPLE_LISTS, ignore_index=True)
    n = df["responses"].str.len()
    df[(n >= 20) & (n <= 200)].to_parquet(out)


PANDAS = {"flatten": pandas_flatten, "analyze": pandas_analyze, "filter": pandas_filter}


def ours(command: str, inp: str, out: str) -> list[str]:
    base = [sys.executable, "-m", f"hpcrollout.{command}", inp]
    if command == "flatten":
        return base + ["--output", out]
    if command == "analyze":
        return base + ["--json"]
    return base + ["--output", out, "--min_length", "20", "--max_length", "200"]


def measure(argv: list[str], stdout_path: Path | None = None) -> dict:
    """Run argv as a child; return its wall time and peak RSS (that child's own, from wait4)."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(stdout_path, "wb")) if stdout_path else subprocess.DEVNULL
        errf = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(argv, stdout=out, stderr=errf)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # wait4 reaped it; tell Popen so it does not wait again
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {rc}:\n{err[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is KiB on Linux


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the file for the peak-RSS runs")
    p.add_argument("--speed_rows", "--speed-rows", type=int, default=1_000_000, help="rows for the pandas comparison")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--workdir", default=None, help="where the generated files go (default: a temp dir, removed)")
    p.add_argument("--skip_rss", "--skip-rss", action="store_true")
    p.add_argument("--skip_speed", "--skip-speed", action="store_true")
    p.add_argument("--pandas", nargs=3, metavar=("COMMAND", "IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pandas:
        PANDAS[args.pandas[0]](args.pandas[1], args.pandas[2])
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hpcr-pp-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"pyarrow {pa.__version__}",
        flush=True,
    )
    try:
        if not args.skip_speed:
            src = work / f"merged_{args.speed_rows}.parquet"
            t0 = time.perf_counter()
            generate_merged(src, args.speed_rows, args.n)
            print(
                f"\n== speed vs pandas: {args.speed_rows:,} rows x n={args.n} ({_mib(src):.0f} MiB, "
                f"generated in {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            print(f"{'command':<9} {'ours_s':>8} {'pandas_s':>9} {'speedup':>8} {'ours_rss':>10} {'pandas_rss':>11}")
            for cmd in ("flatten", "analyze", "filter"):
                a = measure(ours(cmd, str(src), str(work / f"ours_{cmd}.out")), work / f"ours_{cmd}.stdout")
                b = measure(
                    [
                        sys.executable,
                        "-m",
                        "hpcrollout.benchmarks.postprocess",
                        "--pandas",
                        cmd,
                        str(src),
                        str(work / f"pandas_{cmd}.out"),
                    ]
                )
                print(
                    f"{cmd:<9} {a['wall_s']:8.1f} {b['wall_s']:9.1f} {b['wall_s'] / a['wall_s']:7.1f}x "
                    f"{a['peak_rss_mib']:7.0f} MiB {b['peak_rss_mib']:8.0f} MiB",
                    flush=True,
                )
        if not args.skip_rss:
            src = work / f"merged_{args.rows}.parquet"
            t0 = time.perf_counter()
            generate_merged(src, args.rows, args.n)
            print(
                f"\n== peak RSS: {args.rows:,} rows x n={args.n} ({_mib(src):.0f} MiB, "
                f"generated in {time.perf_counter() - t0:.0f} s); target < 1024 MiB each",
                flush=True,
            )
            print(f"{'command':<9} {'wall_s':>8} {'peak_rss':>10} {'target':>7}")
            for cmd in ("flatten", "analyze", "filter"):
                out = work / f"big_{cmd}.out"
                r = measure(ours(cmd, str(src), str(out)), work / f"big_{cmd}.stdout")
                ok = "ok" if r["peak_rss_mib"] < 1024 else "OVER"
                print(f"{cmd:<9} {r['wall_s']:8.1f} {r['peak_rss_mib']:7.0f} MiB {ok:>7}", flush=True)
                if out.exists():
                    out.unlink()  # disk: the flattened 10^7-row file is large
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
