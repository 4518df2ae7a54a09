"""Shared pieces of the scoring tests: a user verifier module written on the spot, scored merged files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

USER_MODULE = '''
import os, re, time

def contains_reference(response, row):
    """1.0 when the row's 'answer' appears in the response (the tests' known-answer rule)."""
    return str(row["answer"]) in response

def by_length(response, row):
    return len(response) / 10

def with_answer(response, row):
    digits = re.findall(r"\\d+", response)
    return (1.0 if digits and digits[-1] == str(row["answer"]) else 0.0), (digits[-1] if digits else None)

def raises(response, row):
    if "boom" in response:
        raise ValueError("boom in " + response)
    return 1

def returns_text(response, row):
    return "yes"

def sleeps(response, row):
    # time.sleep is interrupted by the soft timeout (SIGALRM)
    if "slow" in response:
        time.sleep(60)
    return 1.0

def hangs_in_c(response, row):
    # sum over a range runs in C and never checks for signals: only the hard timeout (a kill) ends it
    if "hang" in response:
        return float(sum(range(10**13)))
    return 1.0

def swallows_everything(response, row):
    # catches even the BaseException of the soft timeout, so the hard timeout must kill the worker
    if "stubborn" in response:
        while True:
            try:
                time.sleep(60)
            except BaseException:
                pass
    return 1.0

def dies(response, row):
    if "die" in response:
        os._exit(3)
    return 1.0
'''


def write_user_module(folder: Path, name: str = "user_verifiers") -> Path:
    """A verifier module in ``folder`` (put on sys.path / PYTHONPATH by the test)."""
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    return path


def merged_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows with uid/prompt/responses/error filled in (responses given), in the merged layout."""
    full = []
    for i, row in enumerate(rows):
        responses = row.get("responses", [])
        full.append(
            {
                "qid": row.get("qid", f"q{i}"),
                "prompt": [{"role": "user", "content": f"question {i}"}],
                **{k: v for k, v in row.items() if k not in ("responses", "error", "qid")},
                "uid": row.get("uid", f"u{i}"),
                "responses": responses,
                "finish_reasons": ["stop"] * len(responses),
                "error": row.get("error"),
            }
        )
    return pa.Table.from_pylist(full)


def write_scored_input(path: Path, rows: list[dict[str, Any]], row_group_size: int = 2) -> Path:
    pq.write_table(merged_table(rows), path, row_group_size=row_group_size)
    return path
