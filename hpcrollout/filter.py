"""Keep responses by length, finish reason and error status, on merged or flattened files, streaming.

Merged input: responses are filtered within each row and every per-sample list column (response_tokens,
finish_reasons, stop_reasons, sample_seeds, token_ids, logprobs, cumulative_logprobs, schema_valid) is filtered
the same way, so the lists stay aligned; rows are kept (possibly with fewer responses) unless --drop_errors / --drop_empty_rows.
Flattened input: rows are kept or dropped. Length and finish-reason filters apply to responses only: error
records (no response) are kept unless --drop_errors, so failures never vanish silently.

Scored input (hpcrollout score): --min_score and --correct / --incorrect select responses by their score (a null
score, from a row without a reference, passes neither); --solve_rate LO:HI keeps the prompts whose share of correct
responses is within [LO, HI], counted over all their scored responses before any other filter (in a flattened
file a prompt is a run of rows with one uid; its error records go too). With --correct and a chat export, that is
rejection-sampled SFT data.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcrollout.errors import HpcRolloutError
from hpcrollout.schema import FINISH_REASONS, INTERNAL_COLUMNS, PART_ROW
from hpcrollout.scoring.metrics import (
    flat_solve_rate_mask,
    parse_solve_rate,
    response_score_mask,
    row_solve_rate_mask,
)
from hpcrollout.sources import (
    DEFAULT_COMPRESSION,
    SAMPLE_COLUMNS,
    Source,
    add_input_args,
    check_output,
    check_sample_lists,
    open_source,
    parquet_output,
    run_standalone,
    whole_prompt_batches,
)

log = logging.getLogger("hpcrollout")

UNITS = ("chars", "tokens")


@dataclass
class Criteria:
    """What a kept response satisfies; None means no bound."""

    min_length: int | None = None
    max_length: int | None = None
    unit: str = "chars"
    finish_reasons: tuple[str, ...] | None = None
    drop_errors: bool = False
    drop_empty_rows: bool = False  # merged input: drop rows left with no responses (error rows included)
    min_score: float | None = None
    correct: bool | None = None  # True: correct responses only; False: incorrect ones only
    solve_rate: tuple[float, float] | None = None
    correct_threshold: float = 1.0  # a response is correct when its score is at least this

    def filters_responses(self) -> bool:
        return (
            self.min_length is not None
            or self.max_length is not None
            or self.finish_reasons is not None
            or self.filters_scores()
        )

    def filters_scores(self) -> bool:
        return self.min_score is not None or self.correct is not None


@dataclass
class FilterReport:
    """Counts in and out."""

    input: str = ""
    output: str = ""
    kind: str = ""
    rows_in: int = 0
    rows_out: int = 0
    responses_in: int = 0
    responses_out: int = 0
    error_rows_in: int = 0
    error_rows_out: int = 0


def _keep_responses(resp: pa.Array, tokens: pa.Array | None, finish: pa.Array | None, c: Criteria) -> np.ndarray:
    """A boolean mask over responses (null responses never pass a length or finish-reason test)."""
    keep = np.ones(len(resp), dtype=bool)
    if c.min_length is not None or c.max_length is not None:
        lengths = pc.utf8_length(resp) if c.unit == "chars" else tokens
        assert lengths is not None
        valid = pc.is_valid(lengths).to_numpy(zero_copy_only=False)
        vals = lengths.fill_null(0).to_numpy(zero_copy_only=False)
        keep &= valid & pc.is_valid(resp).to_numpy(zero_copy_only=False)
        if c.min_length is not None:
            keep &= vals >= c.min_length
        if c.max_length is not None:
            keep &= vals <= c.max_length
    if c.finish_reasons is not None:
        assert finish is not None
        keep &= (
            pc.is_in(finish, pa.array(c.finish_reasons, pa.string())).fill_null(False).to_numpy(zero_copy_only=False)
        )
    return keep


def _rebuild_list(col: pa.Array, keep: np.ndarray, new_lengths: np.ndarray) -> pa.Array:
    """The list column with only the kept elements (keep is over list_flatten(col)), nulls kept null."""
    values = pc.list_flatten(col).filter(pa.array(keep))
    offsets = np.zeros(len(col) + 1, dtype=np.int64 if pa.types.is_large_list(col.type) else np.int32)
    np.cumsum(new_lengths, out=offsets[1:])
    mask = pc.is_null(col) if col.null_count else None
    cls = pa.LargeListArray if pa.types.is_large_list(col.type) else pa.ListArray
    out = cls.from_arrays(pa.array(offsets), values, mask=mask)
    return out.cast(col.type) if out.type != col.type else out


def filter_merged_batch(batch: pa.RecordBatch, c: Criteria, path: Path, first_row: int) -> pa.RecordBatch:
    """Filter responses within each row, keeping all per-sample list columns aligned."""
    names = batch.schema.names
    resp_list = batch.column("responses")
    lengths = pc.list_value_length(resp_list).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    sample_cols = [n for n in SAMPLE_COLUMNS if n in names]
    check_sample_lists(batch, path, first_row)
    columns = dict(zip(names, batch.columns, strict=True))
    parent = np.repeat(np.arange(batch.num_rows), lengths)
    if c.filters_responses():
        resp = pc.list_flatten(resp_list)
        tokens = pc.list_flatten(columns["response_tokens"]) if "response_tokens" in columns else None
        finish = pc.list_flatten(columns["finish_reasons"]) if "finish_reasons" in columns else None
        keep = _keep_responses(resp, tokens, finish, c)
        if c.filters_scores():
            keep &= response_score_mask(pc.list_flatten(columns["scores"]), c.min_score, c.correct, c.correct_threshold)
        new_lengths = np.bincount(parent[keep], minlength=batch.num_rows)
        for name in sample_cols:
            columns[name] = _rebuild_list(columns[name], keep, new_lengths)
    else:
        new_lengths = lengths
    row_keep = np.ones(batch.num_rows, dtype=bool)
    if c.solve_rate is not None:  # the prompt's solve rate over all its responses, before the response filters
        row_keep &= row_solve_rate_mask(batch.column("scores"), c.solve_rate, c.correct_threshold)
    if c.drop_errors and "error" in columns:
        row_keep &= pc.is_null(columns["error"]).to_numpy(zero_copy_only=False)
    if c.drop_empty_rows:
        row_keep &= new_lengths > 0
    out = pa.RecordBatch.from_arrays(list(columns.values()), schema=batch.schema)
    return out if row_keep.all() else out.filter(pa.array(row_keep))


def filter_flat_batch(batch: pa.RecordBatch, c: Criteria) -> pa.RecordBatch:
    """Keep flattened rows whose response passes; error records pass unless drop_errors."""
    names = batch.schema.names
    resp = batch.column("response")
    keep = _keep_responses(
        resp,
        batch.column("response_tokens") if "response_tokens" in names else None,
        batch.column("finish_reason") if "finish_reason" in names else None,
        c,
    )
    if c.filters_scores():
        keep &= response_score_mask(batch.column("score"), c.min_score, c.correct, c.correct_threshold)
    if "error" in names:
        is_error = pc.is_valid(batch.column("error")).to_numpy(zero_copy_only=False)
        keep = np.where(is_error, not c.drop_errors, keep)
    if c.solve_rate is not None:  # whole prompts per batch (whole_prompt_batches); error records have no rate
        keep &= flat_solve_rate_mask(batch, c.solve_rate, c.correct_threshold)
    return batch if keep.all() else batch.filter(pa.array(keep))


def _check_columns(source: Source, c: Criteria) -> None:
    flat = source.is_flattened
    if c.unit == "tokens" and (c.min_length is not None or c.max_length is not None):
        source.require("response_tokens" if flat else "response_tokens", why="for --unit tokens")
    if c.finish_reasons is not None:
        source.require("finish_reason" if flat else "finish_reasons", why="for --finish_reason")
    if c.drop_errors:
        source.require("error", why="for --drop_errors")
    if c.filters_scores() or c.solve_rate is not None:
        scores = "score" if flat else "scores"
        if not source.has(scores):
            raise HpcRolloutError(
                f"{source.path} has no {scores!r} column, needed for --min_score/--correct/--incorrect/--solve_rate; "
                f"score it first: hpcrollout score {source.path} --output scored.parquet --verifier ..."
            )
    if c.solve_rate is not None and flat:
        source.require("uid", why="for --solve_rate on a flattened file (a prompt is a run of rows with one uid)")


def filter_file(
    input_path: str | Path,
    output: str | Path,
    criteria: Criteria,
    batch_rows: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
) -> FilterReport:
    """Filter a merged/flattened file or run directory into a Parquet file of the same layout."""
    if criteria.unit not in UNITS:
        raise HpcRolloutError(f"--unit must be one of {', '.join(UNITS)}, got {criteria.unit!r}")
    for name in ("min_length", "max_length"):
        v = getattr(criteria, name)
        if v is not None and v < 0:
            raise HpcRolloutError(f"--{name} must be >= 0, got {v}")
    if (
        criteria.min_length is not None
        and criteria.max_length is not None
        and criteria.min_length > criteria.max_length
    ):
        raise HpcRolloutError(f"--min_length {criteria.min_length} is above --max_length {criteria.max_length}")
    unknown = [r for r in criteria.finish_reasons or () if r not in FINISH_REASONS]
    if unknown:
        raise HpcRolloutError(
            f"--finish_reason {', '.join(unknown)}: not a finish reason; responses end with one of "
            f"{', '.join(FINISH_REASONS)} (stop: EOS or a stop string, length: hit max_tokens, abort: cut off)"
        )
    source = open_source(input_path, batch_rows)
    _check_columns(source, criteria)
    out = check_output(source, output)
    drop = set(INTERNAL_COLUMNS) | {PART_ROW}
    keep_cols = [n for n in source.schema.names if n not in drop]
    schema = pa.schema([source.schema.field(n) for n in keep_cols])
    report = FilterReport(input=str(source.path), output=str(out), kind=source.kind)
    resp_col = "response" if source.is_flattened else "responses"
    with parquet_output(out, schema, compression) as writer:
        batches = source.batches(keep_cols if len(keep_cols) != len(source.schema.names) else None)
        if source.is_flattened and criteria.solve_rate is not None:
            batches = whole_prompt_batches(batches)
        for batch in batches:
            if source.is_flattened:
                kept = filter_flat_batch(batch, criteria)
                report.responses_in += batch.num_rows - batch.column(resp_col).null_count
                report.responses_out += kept.num_rows - kept.column(resp_col).null_count
            else:
                kept = filter_merged_batch(batch, criteria, source.path, report.rows_in)
                report.responses_in += _count_items(batch.column(resp_col))
                report.responses_out += _count_items(kept.column(resp_col))
            report.rows_in += batch.num_rows
            report.rows_out += kept.num_rows
            if "error" in schema.names:
                report.error_rows_in += batch.num_rows - batch.column("error").null_count
                report.error_rows_out += kept.num_rows - kept.column("error").null_count
            if kept.num_rows:
                writer.write_batch(kept)
    return report


def _count_items(col: pa.Array) -> int:
    return int(pc.sum(pc.list_value_length(col)).as_py() or 0)


def format_report(r: FilterReport) -> str:
    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f}%" if b else "-"

    return (
        f"kept {r.rows_out:,} of {r.rows_in:,} rows ({pct(r.rows_out, r.rows_in)}), "
        f"{r.responses_out:,} of {r.responses_in:,} responses ({pct(r.responses_out, r.responses_in)}), "
        f"{r.error_rows_out:,} of {r.error_rows_in:,} error rows -> {r.output}"
    )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, output="parquet")
    parser.add_argument(
        "--min_length", "--min-length", type=int, default=None, help="Keep responses at least this long."
    )
    parser.add_argument(
        "--max_length", "--max-length", type=int, default=None, help="Keep responses at most this long."
    )
    parser.add_argument("--unit", choices=UNITS, default="chars", help="Length unit (default: chars).")
    parser.add_argument(
        "--finish_reason",
        "--finish-reason",
        action="append",
        default=None,
        help="Keep only responses with this finish reason (repeat or comma-separate: stop,length).",
    )
    parser.add_argument("--drop_errors", "--drop-errors", action="store_true", help="Drop error rows.")
    parser.add_argument(
        "--drop_empty_rows",
        "--drop-empty-rows",
        action="store_true",
        help="Merged input: drop rows left with no responses (error rows included).",
    )
    parser.add_argument(
        "--min_score",
        "--min-score",
        type=float,
        default=None,
        help="Scored input: keep responses scoring at least this.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--correct", action="store_true", help="Scored input: keep only correct responses.")
    which.add_argument("--incorrect", action="store_true", help="Scored input: keep only incorrect responses.")
    parser.add_argument(
        "--solve_rate",
        "--solve-rate",
        default=None,
        metavar="LO:HI",
        help="Scored input: keep prompts whose share of correct responses is in [LO, HI] (0.1:0.9).",
    )
    parser.add_argument(
        "--correct_threshold",
        "--correct-threshold",
        type=float,
        default=1.0,
        help="A response is correct when its score is at least this (default: %(default)s).",
    )
    parser.add_argument("--json", action="store_true", help="Print the counts as JSON.")


def main(args: argparse.Namespace) -> int:
    finish = None
    if args.finish_reason:
        finish = tuple(x.strip() for v in args.finish_reason for x in v.split(",") if x.strip())
    criteria = Criteria(
        min_length=args.min_length,
        max_length=args.max_length,
        unit=args.unit,
        finish_reasons=finish,
        drop_errors=args.drop_errors,
        drop_empty_rows=args.drop_empty_rows,
        min_score=args.min_score,
        correct=True if args.correct else False if args.incorrect else None,
        solve_rate=parse_solve_rate(args.solve_rate) if args.solve_rate is not None else None,
        correct_threshold=args.correct_threshold,
    )
    r = filter_file(args.input, args.output, criteria, args.batch_rows, args.compression)
    print(json.dumps(asdict(r), indent=2) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_standalone(__doc__.splitlines()[0], add_cli_args, main))
