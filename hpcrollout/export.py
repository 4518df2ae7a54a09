"""Export to JSONL, streaming: rows as they are, or chat messages (prompt + assistant response) for SFT tooling.

Formats (--format):
  rows               one object per row of the input (per prompt for merged input, per response for flattened)
  messages           one object per response: {"messages": [...prompt messages, {"role": "assistant", ...}], ...}
  prompt_completion  one object per response: {"prompt": [...messages], "completion": [{"role": "assistant", ...}]}
The chat forms skip error records and null responses (counted in the summary) and add the --extra columns
(default uid, sample_index, finish_reason, and score if the input is scored) so every example can be traced
back. A raw-string prompt becomes one user message. Output ending in .gz is gzip-compressed. Written to a temp
file and renamed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hpcrollout.errors import HpcRolloutError
from hpcrollout.prompts import BadPrompt, normalize_prompt
from hpcrollout.rundir import atomic_path
from hpcrollout.schema import INTERNAL_COLUMNS, PART_ROW
from hpcrollout.sources import SAMPLE_COLUMNS, Source, add_input_args, open_source, run_standalone

log = logging.getLogger("hpcrollout")

FORMATS = ("rows", "messages", "prompt_completion")
DEFAULT_EXTRA = ("uid", "sample_index", "finish_reason", "score")  # score: only in a scored input


@dataclass
class ExportReport:
    """What was written and what was skipped."""

    output: str = ""
    format: str = ""
    rows_in: int = 0
    records_out: int = 0
    skipped_errors: int = 0  # chat forms: error records / null responses
    skipped_bad_prompts: int = 0  # chat forms: prompt cells that are not usable messages


def _prompt_column(source: Source, given: str | None) -> str:
    if given:
        return given
    if source.run_dir is not None:
        try:
            return source.run_dir.load_config().data.prompt_column
        except Exception as exc:  # noqa: BLE001 - fall back to the default name
            log.warning("could not read data.prompt_column from %s: %s", source.run_dir.config_path, exc)
    return "prompt"


def _per_response(source: Source, batch_rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rows of either layout -> one dict per response in flattened column names (error rows: response None)."""
    if source.is_flattened:
        yield from batch_rows
        return
    for row in batch_rows:
        lists = {m: row.get(m) or [] for m in SAMPLE_COLUMNS if m in row}
        n = len(lists["responses"])
        if n == 0:
            flat = {k: v for k, v in row.items() if k not in SAMPLE_COLUMNS}
            yield {**flat, "sample_index": None, "response": None}
            continue
        base = {k: v for k, v in row.items() if k not in SAMPLE_COLUMNS}
        for i in range(n):
            item = dict(base, sample_index=i)
            for m, values in lists.items():
                item[SAMPLE_COLUMNS[m]] = values[i] if i < len(values) else None
            yield item


def _chat_record(item: dict[str, Any], prompt_col: str, fmt: str, extra: tuple[str, ...]) -> dict[str, Any] | None:
    messages, text = normalize_prompt(item.get(prompt_col), images=True)
    for m in messages or []:
        if isinstance(m["content"], list):
            m["content"] = [_exported_part(p) for p in m["content"]]
    if messages is None:
        messages = [{"role": "user", "content": text or ""}]
    answer = {"role": "assistant", "content": item["response"]}
    if fmt == "messages":
        rec: dict[str, Any] = {"messages": [*messages, answer]}
    else:
        rec = {"prompt": messages, "completion": [answer]}
    for key in extra:
        if key in item:
            rec[key] = item[key]
    return rec


def _exported_part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part as the input gave it: text, an image_url, or {"type": "image"} (the image column's next)."""
    if part["type"] != "image":
        return part
    return {"type": "image_url", "image_url": {"url": part["source"]}} if part["source"] else {"type": "image"}


def _open_text(path: Path, gz: bool) -> IO[str]:
    if gz:
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def export_jsonl(
    input_path: str | Path,
    output: str | Path,
    fmt: str = "rows",
    prompt_column: str | None = None,
    extra: tuple[str, ...] = DEFAULT_EXTRA,
    columns: tuple[str, ...] | None = None,
    batch_rows: int | None = None,
) -> ExportReport:
    """Write the input as JSONL in the given format; returns counts."""
    if fmt not in FORMATS:
        raise HpcRolloutError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = open_source(input_path, batch_rows)
    out = Path(output)
    if out.is_dir():
        raise HpcRolloutError(f"--output {out} is a directory; give a .jsonl path")
    drop = set(INTERNAL_COLUMNS) | {PART_ROW}
    read_cols = [n for n in source.schema.names if n not in drop]
    if columns:
        source.require(*columns, why="for --columns")
        read_cols = list(columns)
    prompt_col = None
    if fmt != "rows":
        prompt_col = _prompt_column(source, prompt_column)
        source.require(prompt_col, why="for the chat forms; name the prompt column with --prompt_column")
        resp = "response" if source.is_flattened else "responses"
        read_cols = list(dict.fromkeys([prompt_col, resp, *read_cols]))
    report = ExportReport(output=str(out), format=fmt)
    with atomic_path(out) as tmp, _open_text(tmp, out.suffix == ".gz") as f:
        for batch in source.batches(read_cols):
            report.rows_in += batch.num_rows
            rows = batch.to_pylist()
            if fmt == "rows":
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str))
                    f.write("\n")
                report.records_out += len(rows)
                continue
            assert prompt_col is not None
            for item in _per_response(source, iter(rows)):
                if item.get("response") is None:
                    report.skipped_errors += 1
                    continue
                try:
                    rec = _chat_record(item, prompt_col, fmt, extra)
                except BadPrompt:
                    report.skipped_bad_prompts += 1
                    continue
                f.write(json.dumps(rec, ensure_ascii=False, default=str))
                f.write("\n")
                report.records_out += 1
    return report


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, output=True)
    parser.add_argument("--format", choices=FORMATS, default="rows", help="Record layout (default: rows).")
    parser.add_argument(
        "--prompt_column",
        "--prompt-column",
        default=None,
        help="Prompt column for the chat forms (default: the run config's data.prompt_column, else 'prompt').",
    )
    parser.add_argument(
        "--extra",
        default=",".join(DEFAULT_EXTRA),
        help="Comma-separated columns added to each chat record (default: %(default)s; '' for none).",
    )
    parser.add_argument("--columns", default=None, help="rows format: comma-separated columns to write (default: all).")


def main(args: argparse.Namespace) -> int:
    extra = tuple(x.strip() for x in args.extra.split(",") if x.strip())
    columns = tuple(x.strip() for x in args.columns.split(",") if x.strip()) if args.columns else None
    r = export_jsonl(args.input, args.output, args.format, args.prompt_column, extra, columns, args.batch_rows)
    skipped = ""
    if r.format != "rows":
        skipped = f" (skipped {r.skipped_errors:,} error records/null responses, {r.skipped_bad_prompts:,} bad prompts)"
    print(f"wrote {r.records_out:,} JSONL records ({r.format} format) from {r.rows_in:,} rows{skipped} -> {r.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_standalone(__doc__.splitlines()[0], add_cli_args, main))
