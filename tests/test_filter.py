"""filter: responses kept by length/finish reason with list columns aligned; error rows; flattened input."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout import filter as filter_mod
from hpcrollout.errors import HpcRolloutError
from hpcrollout.filter import Criteria, filter_file
from hpcrollout.flatten import flatten
from tests.test_sources import merged_rows, write_merged

SAMPLE_LISTS = ("responses", "response_tokens", "finish_reasons", "stop_reasons", "sample_seeds")


def _by_uid(path: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in pq.read_table(path).to_pylist()}


@pytest.mark.parametrize("batch_rows", [None, 1, 3])
def test_chars_filter_keeps_lists_aligned(tmp_path: Path, batch_rows: int | None) -> None:
    out = tmp_path / "out.parquet"
    # chars: a = 5 5 9 0, b = 6 10 2 (日本語の答え counts 6 characters, not 18 bytes), d = 4 4 4 4
    r = filter_file(write_merged(tmp_path / "m.parquet"), out, Criteria(min_length=5, max_length=9), batch_rows)
    assert (r.rows_in, r.rows_out, r.responses_in, r.responses_out) == (4, 4, 11, 4)
    assert (r.error_rows_in, r.error_rows_out) == (1, 1)
    rows = _by_uid(out)
    assert rows["a"]["responses"] == ["Hello", "Hello", "Bonjour 🙂"]
    assert rows["a"]["response_tokens"] == [2, 2, 4]
    assert rows["a"]["finish_reasons"] == ["stop", "stop", "length"]
    assert rows["a"]["sample_seeds"] == [0, 1, 2]
    assert rows["b"]["responses"] == ["日本語の答え"] and rows["b"]["sample_seeds"] == [100]
    assert rows["c"]["responses"] == [] and rows["c"]["error"].startswith("prompt has")
    assert rows["d"]["responses"] == [] and rows["d"]["stop_reasons"] == []
    assert pq.read_schema(out) == pq.read_schema(tmp_path / "m.parquet").remove_metadata()


def test_tokens_finish_reason_drop_errors_and_empty_rows(tmp_path: Path) -> None:
    src = write_merged(tmp_path / "m.parquet")
    out = tmp_path / "out.parquet"
    r = filter_file(src, out, Criteria(min_length=2, unit="tokens", finish_reasons=("stop",)))
    assert (r.rows_out, r.responses_out) == (4, 3)  # a: Hello, Hello; b: x * 10
    assert _by_uid(out)["b"]["response_tokens"] == [10]
    r = filter_file(src, out, Criteria(finish_reasons=("length",), drop_errors=True))
    assert (r.rows_out, r.responses_out, r.error_rows_out) == (3, 2, 0)
    assert sorted(_by_uid(out)) == ["a", "b", "d"]
    r = filter_file(src, out, Criteria(finish_reasons=("length",), drop_empty_rows=True))
    assert sorted(_by_uid(out)) == ["a", "b"]  # c (error, no responses) and d (none left) dropped
    assert _by_uid(out)["b"]["responses"] == ["日本語の答え"]


def test_flattened_input_matches_merged(tmp_path: Path) -> None:
    src = write_merged(tmp_path / "m.parquet")
    flat = tmp_path / "flat.parquet"
    flatten(src, flat)
    crit = Criteria(min_length=1, max_length=6)
    # filter then flatten == flatten then filter (error rows are kept both ways)
    filter_file(src, tmp_path / "fm.parquet", crit)
    flatten(tmp_path / "fm.parquet", tmp_path / "fm_flat.parquet")
    r = filter_file(flat, tmp_path / "ff.parquet", crit, batch_rows=2)
    assert (r.kind, r.rows_in, r.responses_in, r.rows_out, r.responses_out) == ("flattened", 12, 11, 9, 8)
    kept = pq.read_table(tmp_path / "ff.parquet")
    assert kept.column("response").to_pylist() == ["Hello", "Hello", "日本語の答え", "  ", None] + ["same"] * 4
    expected = pq.read_table(tmp_path / "fm_flat.parquet").drop_columns(["sample_index"])
    # sample_index differs by design: flattened filtering keeps the original index of each response
    assert kept.drop_columns(["sample_index"]).to_pylist() == [
        r for r in expected.to_pylist() if r["response"] is not None or r["error"] is not None
    ]
    r = filter_file(flat, tmp_path / "ff.parquet", Criteria(drop_errors=True))
    assert (r.rows_out, r.responses_out, r.error_rows_out) == (11, 11, 0)


def test_empty_input(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    r = filter_file(write_merged(tmp_path / "m.parquet", rows=[]), out, Criteria(min_length=3))
    assert (r.rows_in, r.rows_out, r.responses_out) == (0, 0, 0)
    assert pq.read_table(out).num_rows == 0


def test_misaligned_lists_name_the_row(tmp_path: Path) -> None:
    rows = merged_rows()
    rows[3]["response_tokens"] = [1, 1]
    src = write_merged(tmp_path / "bad.parquet", rows)
    with pytest.raises(HpcRolloutError, match=r"bad\.parquet: row 3 has 4 responses but 2 response_tokens"):
        filter_file(src, tmp_path / "out.parquet", Criteria(min_length=1), batch_rows=2)
    assert not (tmp_path / "out.parquet").exists()  # a failed filter leaves no file under the final name


def test_argument_errors(tmp_path: Path) -> None:
    src = write_merged(tmp_path / "m.parquet")
    with pytest.raises(HpcRolloutError, match="--min_length 5 is above --max_length 2"):
        filter_file(src, tmp_path / "o.parquet", Criteria(min_length=5, max_length=2))
    with pytest.raises(HpcRolloutError, match="is the input file"):
        filter_file(src, src, Criteria(min_length=1))
    pq.write_table(pa.table({"uid": ["a"], "response": ["x"]}), tmp_path / "f.parquet")
    with pytest.raises(
        HpcRolloutError, match=r"f\.parquet has no column 'response_tokens' \(needed for --unit tokens\)"
    ):
        filter_file(tmp_path / "f.parquet", tmp_path / "o.parquet", Criteria(min_length=1, unit="tokens"))


def test_cli_both_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    filter_mod.add_cli_args(parser)
    src = str(write_merged(tmp_path / "m.parquet"))
    out = str(tmp_path / "o.parquet")
    a = parser.parse_args([src, "-o", out, "--min-length", "5", "--max-length", "9", "--finish-reason", "stop,length"])
    b = parser.parse_args([src, "-o", out, "--min_length", "5", "--max_length", "9", "--finish_reason", "stop",
                           "--finish_reason", "length"])  # fmt: skip
    assert (a.min_length, a.max_length) == (b.min_length, b.max_length) == (5, 9)
    assert filter_mod.main(a) == 0
    assert "kept 4 of 4 rows (100.0%), 4 of 11 responses (36.4%), 1 of 1 error rows" in capsys.readouterr().out
    assert filter_mod.main(b) == 0
    args = parser.parse_args([src, "-o", out, "--drop-errors", "--drop-empty-rows", "--unit", "tokens",
                              "--min-length", "8", "--json"])  # fmt: skip
    assert filter_mod.main(args) == 0
    assert '"rows_out": 1' in capsys.readouterr().out.split("kept")[-1]
