"""Health report of a merged/flattened output or run directory: counts, lengths, finish reasons, diversity, errors.

Streams the input batch by batch, so memory stays bounded whatever the file size. Percentiles are exact:
token counts and character lengths are kept as counts histograms (one counter per value), except character
lengths of 1,048,576 and more, which fall into 1%-wide logarithmic buckets (a percentile landing there is
within 1%). Percentiles use the nearest-rank rule (numpy's ``method="inverted_cdf"``). Duplicates and
diversity are per prompt: a duplicate is a response identical to an earlier response of the same prompt.
In a flattened file a prompt is a run of consecutive rows with the same uid, as flatten writes them.
With structured outputs, the share of responses valid for their constraint (the ``schema_valid`` flags that
are set; see hpcrollout/structured.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcrollout.errors import HpcRolloutError
from hpcrollout.histogram import LengthHistogram
from hpcrollout.sources import Source, WholePrompts, add_input_args, open_source, prompt_starts, run_standalone

if TYPE_CHECKING:
    from hpcrollout.scoring.metrics import ScoreAnalysis

log = logging.getLogger("hpcrollout")

MAX_ERROR_KINDS = 1000  # distinct error messages counted exactly; the rest go to "(other)"
ERROR_EXAMPLES = 5


def _np(arr: pa.Array | pa.ChunkedArray, fill: Any = 0) -> np.ndarray:
    return arr.fill_null(fill).to_numpy(zero_copy_only=False)


class Analysis:
    """Running totals over batches; ``result()`` gives the report as a dict."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.rows = 0
        self.prompts = 0
        self.responses = 0
        self.error_rows = 0
        self.no_response_rows = 0  # no responses and no error: should not happen, worth flagging
        self.errors: Counter[str] = Counter()
        self.error_examples: list[dict[str, Any]] = []
        self.n_per_row: Counter[int] = Counter()
        self.chars = LengthHistogram()
        self.tokens = LengthHistogram()
        self.prompt_tokens = LengthHistogram()
        self.finish: Counter[str] = Counter()
        self.length_finished_max_tokens: int | None = None
        self.empty = 0
        self.duplicates = 0
        self.diversity: Counter[tuple[int, int]] = Counter()  # (distinct, n) -> prompts
        self.has_groups = True
        self.schema_checked: int | None = None  # responses with a schema_valid flag (None: no such column)
        self.schema_valid = 0
        self._whole = WholePrompts()  # flattened input: whole prompts, a uid run never split over two batches

    # ---- per response ----
    def _responses(self, resp: pa.Array, tokens: pa.Array | None, finish: pa.Array | None) -> None:
        self.responses += len(resp)
        chars = _np(pc.utf8_length(resp))
        self.chars.add(chars)
        blank = pc.or_(pc.equal(pc.utf8_length(resp), 0), pc.utf8_is_space(resp))
        self.empty += int(pc.sum(blank.fill_null(True)).as_py() or 0)
        if tokens is not None:
            self.tokens.add(tokens.drop_null().to_numpy(zero_copy_only=False))
        if finish is not None:
            for value, n in zip(*_value_counts(finish), strict=True):
                self.finish[value if value is not None else "(none)"] += n
            if tokens is not None and len(tokens) == len(finish):
                hit = pc.max(tokens.filter(pc.equal(finish, "length").fill_null(False))).as_py()
                if hit is not None:
                    self.length_finished_max_tokens = max(hit, self.length_finished_max_tokens or 0)

    def _schema_valid(self, flags: pa.Array) -> None:
        """Structured outputs: how many responses were checked against their constraint, and passed."""
        self.schema_checked = (self.schema_checked or 0) + len(flags) - flags.null_count
        self.schema_valid += int(pc.sum(flags).as_py() or 0)

    # ---- per prompt ----
    def _prompts(
        self,
        parent: np.ndarray,
        resp: pa.Array,
        ngroups: int,
        errors: pa.Array | None,
        uids: pa.Array | None,
        prompt_tokens: pa.Array | None,
    ) -> None:
        self.prompts += ngroups
        n = np.bincount(parent, minlength=ngroups)
        for k, c in enumerate(np.bincount(n).tolist()):
            if c:
                self.n_per_row[k] += c
        if len(resp):
            # Distinct responses per prompt: unique (prompt, text code) pairs, hashed (no sort).
            codes = _np(pc.dictionary_encode(resp.fill_null("")).indices).astype(np.int64)
            width = int(codes.max()) + 1
            pairs = pc.unique(pa.array(parent.astype(np.int64) * width + codes)).to_numpy()
            distinct = np.bincount(pairs // width, minlength=ngroups)
            self.duplicates += int(n.sum() - distinct.sum())
            has = n > 0
            kmax = int(n.max()) + 1
            combo = np.bincount(distinct[has] * kmax + n[has])
            for code in np.flatnonzero(combo).tolist():
                self.diversity[(code // kmax, code % kmax)] += int(combo[code])
        if errors is not None:
            failed = pc.is_valid(errors)
            nfail = int(pc.sum(failed).as_py() or 0)
            self.error_rows += nfail
            self.no_response_rows += int(((n == 0) & ~_np(failed, False)).sum())
            if nfail:
                msgs = errors.filter(failed)
                for value, c in zip(*_value_counts(msgs), strict=True):
                    key = value if value in self.errors or len(self.errors) < MAX_ERROR_KINDS else "(other)"
                    self.errors[key] += c
                if len(self.error_examples) < ERROR_EXAMPLES:
                    ids = uids.filter(failed) if uids is not None else pa.nulls(nfail)
                    for uid, msg in zip(ids.to_pylist(), msgs.to_pylist(), strict=True):
                        if len(self.error_examples) < ERROR_EXAMPLES:
                            self.error_examples.append({"uid": uid, "error": msg})
        else:
            self.no_response_rows += int((n == 0).sum())
        if prompt_tokens is not None:
            self.prompt_tokens.add(prompt_tokens.drop_null().to_numpy(zero_copy_only=False))

    def add_merged(self, batch: pa.RecordBatch) -> None:
        names = batch.schema.names
        col = batch.column
        self.rows += batch.num_rows
        resp_list = col("responses")
        resp = pc.list_flatten(resp_list)
        tokens = pc.list_flatten(col("response_tokens")) if "response_tokens" in names else None
        finish = pc.list_flatten(col("finish_reasons")) if "finish_reasons" in names else None
        self._responses(resp, tokens, finish)
        if "schema_valid" in names:
            self._schema_valid(pc.list_flatten(col("schema_valid")))
        parent = _np(pc.list_parent_indices(resp_list)).astype(np.int64)
        self._prompts(
            parent,
            resp,
            batch.num_rows,
            col("error") if "error" in names else None,
            col("uid") if "uid" in names else None,
            col("prompt_tokens") if "prompt_tokens" in names else None,
        )

    def add_flattened(self, batch: pa.RecordBatch | None) -> None:
        """One flattened batch (None: end of input, flush the last group)."""
        if batch is not None:
            self.rows += batch.num_rows
            names = batch.schema.names
            ok = pc.is_valid(batch.column("response"))
            kept = batch.filter(ok)
            self._responses(
                kept.column("response"),
                kept.column("response_tokens") if "response_tokens" in names else None,
                kept.column("finish_reason") if "finish_reason" in names else None,
            )
            if "schema_valid" in names:
                self._schema_valid(kept.column("schema_valid"))
            if "uid" not in names:
                self.has_groups = False
                if "error" in names:
                    self.error_rows += batch.num_rows - batch.column("error").null_count
                return
            table = self._whole.push(
                pa.Table.from_batches(
                    [batch.select([c for c in ("uid", "response", "error", "prompt_tokens") if c in names])]
                )
            )
        else:
            table = self._whole.push(None)
        if table is None:
            return
        uid = table.column("uid").chunk(0)
        starts = prompt_starts(uid)
        group = np.cumsum(starts) - 1
        ngroups = int(group[-1]) + 1
        first = pa.array(np.flatnonzero(starts[: len(group)]))
        resp = table.column("response").combine_chunks() if table.num_rows else pa.array([], pa.string())
        valid = _np(pc.is_valid(resp), False)
        names = table.schema.names
        self._prompts(
            group[valid],
            resp.filter(pa.array(valid)),
            ngroups,
            table.column("error").combine_chunks().take(first) if "error" in names else None,
            uid.take(first),
            table.column("prompt_tokens").combine_chunks().take(first) if "prompt_tokens" in names else None,
        )

    def result(self, max_tokens: int | None = None, max_tokens_from: str = "") -> dict[str, Any]:
        if max_tokens is None and self.length_finished_max_tokens is not None:
            max_tokens, max_tokens_from = self.length_finished_max_tokens, "inferred: most tokens of a 'length' finish"
        r = self.responses
        distinct_total = sum(d * c for (d, _), c in self.diversity.items())
        n_total = sum(k * c for (_, k), c in self.diversity.items())
        out: dict[str, Any] = {
            "input": str(self.source.path),
            "kind": self.source.kind,
            "rows": self.rows,
            "prompts": self.prompts if self.has_groups else None,
            "responses": r,
            "responses_per_prompt": {str(k): v for k, v in sorted(self.n_per_row.items())},
            "error_rows": self.error_rows,
            "errors": dict(self.errors.most_common(10)),
            "error_examples": self.error_examples,
            "rows_without_responses_or_error": self.no_response_rows,
            "response_tokens": self.tokens.summary(),
            "response_chars": self.chars.summary(),
            "prompt_tokens": self.prompt_tokens.summary(),
            "percentiles": "exact (counts histogram, nearest rank); chars >= 1,048,576 in 1%-wide log buckets",
            "finish_reasons": dict(self.finish.most_common()),
            "max_tokens": max_tokens,
            "max_tokens_from": max_tokens_from or None,
            "hit_max_tokens": self.finish.get("length", 0),
            "hit_max_tokens_frac": fraction(self.finish.get("length", 0), r),
            # structured outputs: responses checked against their constraint (null flags: none, or a grammar)
            "schema_checked": self.schema_checked,
            "schema_valid": self.schema_valid if self.schema_checked is not None else None,
            "schema_valid_frac": fraction(self.schema_valid, self.schema_checked or 0),
            "empty_responses": self.empty,
            "empty_frac": fraction(self.empty, r),
            "duplicate_responses": self.duplicates,
            "duplicate_frac": fraction(self.duplicates, r),
            "diversity": {
                "mean_distinct_frac": fraction(distinct_total, n_total),
                "all_distinct_prompts": sum(c for (d, k), c in self.diversity.items() if d == k),
                "all_identical_prompts": sum(c for (d, k), c in self.diversity.items() if d == 1 and k > 1),
                "distinct_of_n": {f"{d}/{k}": c for (d, k), c in sorted(self.diversity.items())},
            }
            if self.has_groups
            else None,
        }
        return out


def fraction(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def _value_counts(arr: pa.Array) -> tuple[list[Any], list[int]]:
    if len(arr) == 0:
        return [], []
    vc = pc.value_counts(arr)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# ---- throughput from a run directory ----


def _epoch(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _read_markers(folder: Path) -> tuple[dict[str, dict[str, Any]], int]:
    found, unreadable = {}, 0
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            unreadable += 1
            continue
        if isinstance(data, dict):
            found[p.stem] = data
    return found, unreadable


def run_throughput(run_dir: str | Path) -> dict[str, Any]:
    """Throughput of a run from its done markers (and progress of unfinished shards from heartbeats)."""
    root = Path(run_dir)
    done, bad_done = _read_markers(root / "done")
    beats, _ = _read_markers(root / "heartbeats")
    total_shards = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        total_shards = len(json.loads((root / "manifest.json").read_text()).get("shards", []))

    def total(key: str) -> float:
        return sum(float(m[key]) for m in done.values() if isinstance(m.get(key), (int, float)))

    tokens, prompts, samples, busy = total("output_tokens"), total("prompts"), total("samples"), total("elapsed_s")
    starts = [t for m in done.values() if (t := _epoch(m.get("started"))) is not None]
    ends = [t for m in done.values() if (t := _epoch(m.get("finished"))) is not None]
    wall = max(ends) - min(starts) if starts and ends and max(ends) > min(starts) else None
    # elapsed_s is the final attempt's: pair it with that attempt's tokens when the marker has them (resumed shards).
    per_shard = []
    for m in done.values():
        tok = m.get("output_tokens_this_attempt", m.get("output_tokens"))
        if isinstance(tok, (int, float)) and isinstance(m.get("elapsed_s"), (int, float)) and m["elapsed_s"] > 0:
            per_shard.append(float(tok) / float(m["elapsed_s"]))
    running = {k: v for k, v in beats.items() if k not in done}
    return {
        "shards_total": total_shards,
        "shards_done": len(done),
        "unreadable_done_markers": bad_done,
        "shards_with_heartbeat_not_done": len(running),
        "output_tokens": int(tokens),
        "prompts": int(prompts),
        "samples": int(samples),
        "shard_seconds": round(busy, 3),
        "wall_s": round(wall, 3) if wall else None,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
        "prompts_per_s": round(prompts / wall, 3) if wall else None,
        "output_tokens_per_shard_s": round(tokens / busy, 2) if busy else None,
        "per_shard_tokens_per_s": (
            {
                "min": round(min(per_shard), 2),
                "mean": round(sum(per_shard) / len(per_shard), 2),
                "max": round(max(per_shard), 2),
            }
            if per_shard
            else None
        ),
    }


# ---- the report ----


def analyze(
    input_path: str | Path,
    plot: str | Path | None = None,
    batch_rows: int | None = None,
    max_tokens: int | None = None,
    partial: bool = False,
    by: str | None = None,
    correct_threshold: float | None = None,
) -> dict[str, Any]:
    """Stream the input once and return the report dict; write the PNG if ``plot`` is given.

    A scored input (hpcrollout score) also gets a ``scoring`` section: mean score, pass@k, maj@n, solve rates,
    overall and by the values of column ``by``.
    """
    source = open_source(input_path, batch_rows, partial)
    analysis = Analysis(source)
    scoring = _score_analysis(source, by, correct_threshold)
    score_cols = (
        [] if scoring is None else ["score", "score_detail"] if source.is_flattened else ["scores", "score_details"]
    )
    score_cols += [by] if by else []
    how = "given" if max_tokens is not None else ""
    if source.run_dir is not None and max_tokens is None:
        try:
            max_tokens, how = source.run_dir.load_config().sampling.max_tokens, "run config"
        except Exception as exc:  # noqa: BLE001 - the report is still useful without the cap
            log.warning("could not read sampling.max_tokens from %s: %s", source.run_dir.config_path, exc)
    if source.is_flattened:
        cols = ["uid", "response", "response_tokens", "finish_reason", "prompt_tokens", "error", "schema_valid"]
        for batch in source.batches(list(dict.fromkeys(cols + score_cols))):
            analysis.add_flattened(batch.select([c for c in cols if c in batch.schema.names]))
            if scoring is not None:
                scoring.add_flattened(batch)
        analysis.add_flattened(None)
        if scoring is not None:
            scoring.add_flattened(None)
    else:
        cols = ["uid", "responses", "response_tokens", "finish_reasons", "prompt_tokens", "error", "schema_valid"]
        for batch in source.batches(list(dict.fromkeys(cols + score_cols))):
            analysis.add_merged(batch)
            if scoring is not None:
                scoring.add_merged(batch)
    report = analysis.result(max_tokens, how)
    if scoring is not None:
        report["scoring"] = scoring.result()
    if source.run_dir is not None:
        report["throughput"] = run_throughput(source.run_dir.root)
    if plot:
        from hpcrollout.analyze_plot import plot_report  # matplotlib only when a plot is asked for

        plot_report(report, analysis, plot)
        report["plot"] = str(plot)
    return report


def _score_analysis(source: Source, by: str | None, threshold: float | None) -> ScoreAnalysis | None:
    """The score statistics to gather, if the input is scored (hpcrollout score); --by needs scores."""
    from hpcrollout.scoring.metrics import CORRECT_AT, ScoreAnalysis

    scored = source.has("score" if source.is_flattened else "scores")
    if not scored:
        if by or threshold is not None:
            raise HpcRolloutError(
                f"{source.path} has no scores, so --by/--correct_threshold have nothing to break down; "
                f"score it first: hpcrollout score {source.path} --output scored.parquet --verifier ..."
            )
        return None
    if source.is_flattened:
        source.require("uid", why="to group a flattened file's responses by prompt for the score report")
    if by:
        source.require(by, why="for --by")
    return ScoreAnalysis(by, CORRECT_AT if threshold is None else threshold)


# The name hpcrollout.demo imports.


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _dist(d: dict[str, Any]) -> str:
    if not d.get("count"):
        return "(none)"

    def f(v: Any) -> str:
        return f"{v:,.1f}" if isinstance(v, float) and not v.is_integer() else f"{int(v):,}"

    return "  ".join(f"{k} {f(d[k])}" for k in ("min", "mean", "p50", "p90", "p99", "max"))


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"{r['input']} ({r['kind']})"]
    add = lines.append
    add(f"  rows                {r['rows']:,}" + (f"   prompts {r['prompts']:,}" if r["prompts"] is not None else ""))
    per = ", ".join(f"{k} x {v:,}" for k, v in r["responses_per_prompt"].items())
    add(f"  responses           {r['responses']:,}" + (f"   (responses per prompt: {per})" if per else ""))
    add(
        f"  error rows          {r['error_rows']:,}"
        + (f"   ({fmt_pct(fraction(r['error_rows'], r['prompts']))} of prompts)" if r["prompts"] else "")
    )
    for msg, n in list(r["errors"].items())[:3]:
        add(f"      {n:>8,} x {msg[:100]}")
    if r["rows_without_responses_or_error"]:
        add(f"  rows with no responses and no error: {r['rows_without_responses_or_error']:,}")
    add(f"  response tokens     {_dist(r['response_tokens'])}")
    add(f"  response chars      {_dist(r['response_chars'])}")
    add(f"  prompt tokens       {_dist(r['prompt_tokens'])}")
    fin = "  ".join(f"{k} {v:,} ({fmt_pct(fraction(v, r['responses']))})" for k, v in r["finish_reasons"].items())
    add(f"  finish reasons      {fin or '(none)'}")
    cap = f"max_tokens {r['max_tokens']:,} ({r['max_tokens_from']})" if r["max_tokens"] else "max_tokens unknown"
    add(f"  hit max_tokens      {r['hit_max_tokens']:,} ({fmt_pct(r['hit_max_tokens_frac'])}; finish 'length'; {cap})")
    if r.get("schema_checked") is not None:
        add(
            f"  schema valid        {r['schema_valid']:,} of {r['schema_checked']:,} checked "
            f"({fmt_pct(r['schema_valid_frac'])}; structured outputs, see schema_valid)"
        )
    add(f"  empty responses     {r['empty_responses']:,} ({fmt_pct(r['empty_frac'])}; empty or whitespace only)")
    add(
        f"  duplicate responses {r['duplicate_responses']:,} ({fmt_pct(r['duplicate_frac'])}; same text as an earlier "
        "response of the same prompt)"
    )
    dv = r["diversity"]
    if dv:
        add(
            f"  diversity           mean distinct/n {fmt_pct(dv['mean_distinct_frac'])}   all distinct "
            f"{dv['all_distinct_prompts']:,} prompts   all identical {dv['all_identical_prompts']:,} prompts"
        )
        add("      distinct/n: " + "  ".join(f"{k} x {v:,}" for k, v in dv["distinct_of_n"].items()))
    add(f"  percentiles         {r['percentiles']}")
    t = r.get("throughput")
    if t:
        shards = f"{t['shards_done']:,}" + (f"/{t['shards_total']:,}" if t["shards_total"] is not None else "")
        add(f"  shards done         {shards}   running (heartbeat, not done) {t['shards_with_heartbeat_not_done']:,}")
        add(
            f"  generated           {t['output_tokens']:,} output tokens, {t['prompts']:,} prompts, "
            f"{t['samples']:,} samples in {t['shard_seconds']:,.0f} shard-seconds"
        )
        if t["wall_s"]:
            add(
                f"  throughput          {t['output_tokens_per_s']:,.1f} output tokens/s, {t['prompts_per_s']:,.2f} "
                f"prompts/s over {t['wall_s']:,.0f} s wall (first start to last finish)"
            )
        if t["per_shard_tokens_per_s"]:
            p = t["per_shard_tokens_per_s"]
            add(f"  per shard           tokens/s min {p['min']:,.1f}  mean {p['mean']:,.1f}  max {p['max']:,.1f}")
    if r.get("scoring"):
        from hpcrollout.scoring.metrics import format_scoring

        lines.extend(format_scoring(r["scoring"]))
    if r.get("plot"):
        add(f"  plot                {r['plot']}")
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, output=False)
    parser.add_argument("--plot", default=None, help="Write a PNG of length histograms, finish reasons, diversity.")
    parser.add_argument(
        "--partial",
        action="store_true",
        help="Run directory still running: analyze the shards finished so far (throughput counts them too).",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument(
        "--max_tokens",
        "--max-tokens",
        type=int,
        default=None,
        help="The sampling cap to mark (default: the run config's, or inferred from 'length' finishes).",
    )
    parser.add_argument(
        "--by", default=None, help="Scored input: break the score report down by this column (e.g. data_source)."
    )
    parser.add_argument(
        "--correct_threshold",
        "--correct-threshold",
        type=float,
        default=None,
        help="Scored input: a response is correct when its score is at least this (default: 1.0).",
    )


def main(args: argparse.Namespace) -> int:
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise HpcRolloutError(f"--plot {args.plot}: give a .png path")
    report = analyze(
        args.input, args.plot, args.batch_rows, args.max_tokens, args.partial, args.by, args.correct_threshold
    )
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_standalone(__doc__.splitlines()[0], add_cli_args, main))
