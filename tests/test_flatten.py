"""flatten: one row per response, error rows kept as one row, unicode intact, streaming in small batches."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout import flatten as flatten_mod
from hpcrollout.errors import HpcRolloutError
from hpcrollout.flatten import flatten
from tests.test_sources import merged_rows, write_merged

FLAT_COLUMNS = [
    "qid", "prompt", "uid", "sample_index", "response", "response_tokens", "finish_reason", "stop_reason",
    "sample_seed", "prompt_tokens", "error",
]  # fmt: skip


@pytest.mark.parametrize("batch_rows", [None, 1, 3])
def test_flatten_rows_columns_and_error_rows(tmp_path: Path, batch_rows: int | None) -> None:
    out = tmp_path / "flat.parquet"
    report = flatten(write_merged(tmp_path / "m.parquet"), out, batch_rows=batch_rows)
    assert (report.rows, report.responses, report.error_rows, report.output_rows) == (4, 11, 1, 12)
    t = pq.read_table(out)
    assert t.column_names == FLAT_COLUMNS
    assert t.schema.field("sample_index").type == pa.int32()
    assert t.schema.field("response_tokens").type == pa.int32()
    rows = t.to_pylist()
    assert [(r["uid"], r["sample_index"]) for r in rows] == [
        ("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2), ("c", None),
        ("d", 0), ("d", 1), ("d", 2), ("d", 3),
    ]  # fmt: skip
    src = merged_rows()
    a2, b0, c = rows[2], rows[4], rows[7]
    assert (a2["response"], a2["response_tokens"], a2["finish_reason"], a2["sample_seed"]) == (
        "Bonjour 🙂",
        4,
        "length",
        2,
    )
    assert b0["response"] == "日本語の答え" and b0["prompt"] == src[1]["prompt"] and b0["qid"] == "q1"
    assert b0["prompt_tokens"] == 11 and b0["error"] is None
    # The error row is not lost: one row, no response, the error and the carried columns kept.
    assert c["response"] is None and c["response_tokens"] is None and c["finish_reason"] is None
    assert c["error"].startswith("prompt has 2,000 characters") and c["qid"] == "q2" and c["prompt_tokens"] == 12


def test_flatten_empty_input(tmp_path: Path) -> None:
    out = tmp_path / "flat.parquet"
    report = flatten(write_merged(tmp_path / "m.parquet", rows=[]), out)
    assert report.output_rows == 0
    t = pq.read_table(out)
    assert t.num_rows == 0 and t.column_names == FLAT_COLUMNS


def test_flatten_optional_columns(tmp_path: Path) -> None:
    rows = merged_rows()[:2]
    for r in rows:
        n = len(r["responses"])
        r["token_ids"] = [[k, k + 1] for k in range(n)]
        r["logprobs"] = [[-0.5, -0.25] for _ in range(n)]
        r["cumulative_logprobs"] = [-0.75] * n
    out = tmp_path / "flat.parquet"
    flatten(write_merged(tmp_path / "m.parquet", rows, logprobs=True), out)
    t = pq.read_table(out)
    assert t.column_names == [*FLAT_COLUMNS, "token_ids", "logprobs", "cumulative_logprob"]
    assert t.schema.field("token_ids").type == pa.list_(pa.int32())
    assert t.column("token_ids").to_pylist()[:3] == [[0, 1], [1, 2], [2, 3]]
    assert t.column("cumulative_logprob").to_pylist()[0] == -0.75


def test_flatten_refuses_flat_input_and_clashing_columns(tmp_path: Path) -> None:
    out = tmp_path / "flat.parquet"
    flatten(write_merged(tmp_path / "m.parquet"), out)
    with pytest.raises(HpcRolloutError, match=r"flat\.parquet is already flattened"):
        flatten(out, tmp_path / "again.parquet")
    table = pq.read_table(tmp_path / "m.parquet").append_column("response", pa.array(["x"] * 4))
    pq.write_table(table, tmp_path / "clash.parquet")
    with pytest.raises(HpcRolloutError, match=r"input column 'response' clashes"):
        flatten(tmp_path / "clash.parquet", tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_flatten_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    flatten_mod.add_cli_args(parser)
    args = parser.parse_args([str(write_merged(tmp_path / "m.parquet")), "--output", str(tmp_path / "f.parquet"),
                              "--batch-rows", "2"])  # fmt: skip
    assert flatten_mod.main(args) == 0
    assert "flattened 4 rows (11 responses, 1 error rows) into 12 rows" in capsys.readouterr().out
