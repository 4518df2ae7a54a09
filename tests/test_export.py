"""export: JSONL rows and chat-message forms from merged and flattened files, unicode intact, errors skipped."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout import export as export_mod
from hpcrollout.errors import HpcRolloutError
from hpcrollout.export import export_jsonl
from hpcrollout.flatten import flatten
from tests.test_sources import merged_rows, write_merged


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_merged(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    r = export_jsonl(write_merged(tmp_path / "m.parquet", row_group_size=3), out, batch_rows=2)
    assert (r.rows_in, r.records_out) == (4, 4)
    recs = _lines(out)
    assert recs == merged_rows()  # every column, the error row included
    assert "日本語の答え" in out.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes


def test_messages_from_merged_and_flattened(tmp_path: Path) -> None:
    src = write_merged(tmp_path / "m.parquet")
    flat = tmp_path / "f.parquet"
    flatten(src, flat)
    for inp in (src, flat):
        out = tmp_path / f"{inp.stem}.jsonl"
        r = export_jsonl(inp, out, fmt="messages", batch_rows=3)
        assert (r.records_out, r.skipped_errors, r.skipped_bad_prompts) == (11, 1, 0)
        recs = _lines(out)
        assert recs[2] == {
            "messages": [
                {"role": "user", "content": "question 0 ¿qué?"},
                {"role": "assistant", "content": "Bonjour 🙂"},
            ],
            "uid": "a",
            "sample_index": 2,
            "finish_reason": "length",
        }
        assert [x["uid"] for x in recs] == ["a"] * 4 + ["b"] * 3 + ["d"] * 4  # the error row "c" is skipped
        assert recs[4]["messages"][-1]["content"] == "日本語の答え"


def test_prompt_completion_raw_prompts_and_extra(tmp_path: Path) -> None:
    rows = merged_rows()
    table = pa.Table.from_pylist(rows).drop_columns(["prompt"]).append_column("text", pa.array(["Say hi"] * 4))
    pq.write_table(table, tmp_path / "raw.parquet")
    out = tmp_path / "pc.jsonl.gz"
    r = export_jsonl(tmp_path / "raw.parquet", out, fmt="prompt_completion", prompt_column="text", extra=("qid",))
    assert r.records_out == 11
    with gzip.open(out, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first == {
        "prompt": [{"role": "user", "content": "Say hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
        "qid": "q0",
    }


def test_rows_flattened_and_columns(tmp_path: Path) -> None:
    flat = tmp_path / "f.parquet"
    flatten(write_merged(tmp_path / "m.parquet"), flat)
    out = tmp_path / "rows.jsonl"
    r = export_jsonl(flat, out, columns=("uid", "sample_index", "response"))
    assert r.records_out == 12
    recs = _lines(out)
    assert recs[7] == {"uid": "c", "sample_index": None, "response": None}
    assert recs[0] == {"uid": "a", "sample_index": 0, "response": "Hello"}


def test_empty_input_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    r = export_jsonl(write_merged(tmp_path / "m.parquet", rows=[]), out, fmt="messages")
    assert r.records_out == 0 and out.read_text() == ""
    with pytest.raises(HpcRolloutError, match=r"m\.parquet has no column 'question' \(needed for the chat forms"):
        export_jsonl(tmp_path / "m.parquet", out, fmt="messages", prompt_column="question")
    with pytest.raises(HpcRolloutError, match=r"nope\.parquet does not exist"):
        export_jsonl(tmp_path / "nope.parquet", out)


def test_bad_prompt_cells_are_counted(tmp_path: Path) -> None:
    rows = merged_rows()
    table = (
        pa.Table.from_pylist(rows).drop_columns(["prompt"]).append_column("prompt", pa.array(["ok", "", "ok", "ok"]))
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    r = export_jsonl(tmp_path / "bad.parquet", tmp_path / "o.jsonl", fmt="messages")
    assert (r.records_out, r.skipped_bad_prompts, r.skipped_errors) == (8, 3, 1)  # row b's prompt is empty


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    export_mod.add_cli_args(parser)
    src = str(write_merged(tmp_path / "m.parquet"))
    args = parser.parse_args([src, "--output", str(tmp_path / "o.jsonl"), "--format", "messages", "--extra", ""])
    assert export_mod.main(args) == 0
    assert "wrote 11 JSONL records (messages format) from 4 rows (skipped 1 error records/null responses" in capsys.readouterr().out
    assert set(_lines(tmp_path / "o.jsonl")[0]) == {"messages"}
