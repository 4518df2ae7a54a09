"""analyze: the exact figures for a constructed file, merged and flattened alike, percentiles, throughput, plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hpcrollout import analyze as analyze_mod
from hpcrollout.analyze import analyze, format_report, run_throughput
from hpcrollout.errors import HpcRolloutError
from hpcrollout.export import export_jsonl
from hpcrollout.filter import Criteria, filter_file
from hpcrollout.flatten import flatten
from hpcrollout.histogram import LengthHistogram
from tests.test_sources import write_merged

# merged_rows(): a = ["Hello", "Hello", "Bonjour 🙂", ""], b = ["日本語の答え", "x" * 10, "  "], c = error, d = "same" x 4
EXPECTED = {
    "prompts": 4,
    "responses": 11,
    "responses_per_prompt": {"0": 1, "3": 1, "4": 2},
    "error_rows": 1,
    "errors": {"prompt has 2,000 characters, more than data.max_prompt_chars=1,000": 1},
    "error_examples": [{"uid": "c", "error": "prompt has 2,000 characters, more than data.max_prompt_chars=1,000"}],
    "rows_without_responses_or_error": 0,
    # chars sorted: 0 2 4 4 4 4 5 5 6 9 10 (characters, not bytes: 日本語の答え is 6, Bonjour 🙂 is 9)
    "response_chars": {"count": 11, "min": 0, "mean": 4.818, "p50": 4.0, "p90": 9.0, "p99": 10.0, "max": 10},
    # tokens sorted: 1 1 1 1 1 1 2 2 4 8 10
    "response_tokens": {"count": 11, "min": 1, "mean": 2.909, "p50": 1.0, "p90": 8.0, "p99": 10.0, "max": 10},
    "prompt_tokens": {"count": 4, "min": 10, "mean": 11.5, "p50": 11.0, "p90": 13.0, "p99": 13.0, "max": 13},
    "finish_reasons": {"stop": 9, "length": 2},
    "max_tokens": 8,
    "hit_max_tokens": 2,
    "hit_max_tokens_frac": 0.181818,
    "empty_responses": 2,
    "empty_frac": 0.181818,
    "duplicate_responses": 4,  # a: one repeat of "Hello"; d: three repeats of "same"
    "duplicate_frac": 0.363636,
    "diversity": {
        "mean_distinct_frac": 0.636364,  # (3 + 3 + 1) / (4 + 3 + 4)
        "all_distinct_prompts": 1,
        "all_identical_prompts": 1,
        "distinct_of_n": {"1/4": 1, "3/3": 1, "3/4": 1},
    },
}


def _check(report: dict, rows: int, kind: str) -> None:
    assert report["rows"] == rows and report["kind"] == kind
    for key, value in EXPECTED.items():
        assert report[key] == value, key


@pytest.mark.parametrize("batch_rows", [None, 1, 3])
def test_exact_counts_merged(tmp_path: Path, batch_rows: int | None) -> None:
    report = analyze(write_merged(tmp_path / "m.parquet"), batch_rows=batch_rows)
    _check(report, rows=4, kind="merged")
    assert report["max_tokens_from"].startswith("inferred")
    assert "throughput" not in report


@pytest.mark.parametrize("batch_rows", [None, 1, 2, 5])
def test_exact_counts_flattened(tmp_path: Path, batch_rows: int | None) -> None:
    # Small batches split a prompt's responses across batches: its group must carry over intact.
    flat = tmp_path / "f.parquet"
    flatten(write_merged(tmp_path / "m.parquet"), flat)
    _check(analyze(flat, batch_rows=batch_rows), rows=12, kind="flattened")


def test_printed_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    analyze_mod.add_cli_args(parser)
    assert analyze_mod.main(parser.parse_args([str(write_merged(tmp_path / "m.parquet")), "--max-tokens", "10"])) == 0
    text = capsys.readouterr().out
    for line in [
        "  rows                4   prompts 4",
        "  responses           11   (responses per prompt: 0 x 1, 3 x 1, 4 x 2)",
        "  error rows          1   (25.0% of prompts)",
        "  response tokens     min 1  mean 2.9  p50 1  p90 8  p99 10  max 10",
        "  response chars      min 0  mean 4.8  p50 4  p90 9  p99 10  max 10",
        "  finish reasons      stop 9 (81.8%)  length 2 (18.2%)",
        "  hit max_tokens      2 (18.2%; finish 'length'; max_tokens 10 (given))",
        "  empty responses     2 (18.2%; empty or whitespace only)",
        "  duplicate responses 4 (36.4%; same text as an earlier response of the same prompt)",
        "      distinct/n: 1/4 x 1  3/3 x 1  3/4 x 1",
    ]:
        assert line in text.splitlines(), line
    assert analyze_mod.main(parser.parse_args([str(tmp_path / "m.parquet"), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["duplicate_responses"] == 4


def test_empty_input_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "plots" / "empty.png"
    report = analyze(write_merged(tmp_path / "m.parquet", rows=[]), plot=png)
    assert report["rows"] == 0 and report["responses"] == 0 and report["error_rows"] == 0
    assert report["response_chars"] == {"count": 0, "min": None, "mean": None, "p50": None, "p90": None,
                                        "p99": None, "max": None}  # fmt: skip
    assert report["finish_reasons"] == {} and report["diversity"]["mean_distinct_frac"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rows                0" in format_report(report)


def test_plot_written(tmp_path: Path) -> None:
    png = tmp_path / "lengths.png"
    report = analyze(write_merged(tmp_path / "m.parquet"), plot=png)
    assert report["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_percentiles_match_numpy_nearest_rank() -> None:
    rng = np.random.default_rng(1)
    values = rng.geometric(0.01, size=5_000)
    h = LengthHistogram()
    for chunk in np.array_split(values, 7):
        h.add(chunk)
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == np.percentile(values, 100 * q, method="inverted_cdf")
    assert (h.min, h.max, h.count, h.total) == (values.min(), values.max(), values.size, values.sum())


def test_huge_lengths_fall_in_one_percent_buckets() -> None:
    values = np.array([3, 5, 2_000_000, 3_000_000, 50_000_000])
    h = LengthHistogram()
    h.add(values)
    assert h.counts.size <= LengthHistogram.EXACT_LIMIT  # memory stays bounded by the exact range
    assert h.quantile(0.2) == 3 and h.quantile(0.4) == 5
    for q, exact in ((0.6, 2_000_000), (0.8, 3_000_000), (1.0, 50_000_000)):
        assert abs(h.quantile(q) - exact) / exact <= 0.01
    assert h.max == 50_000_000 and h.summary()["mean"] == values.mean()


def test_throughput_from_markers(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "heartbeats").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{} for _ in range(6)]}))
    markers = {
        "00000": {"output_tokens": 1000, "prompts": 10, "samples": 40, "elapsed_s": 10, "started": 100.0,
                  "finished": 110.0},
        "00001": {"output_tokens": 3000, "prompts": 30, "samples": 120, "elapsed_s": 20,
                  "started": "1970-01-01T00:01:45+00:00", "finished": 130},
        "00002": {},  # an older marker without the figures: counted as done, adds nothing
    }  # fmt: skip
    for name, data in markers.items():
        (tmp_path / "done" / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "done" / "00003.json").write_text("{truncated")
    (tmp_path / "heartbeats" / "00001.json").write_text("{}")
    (tmp_path / "heartbeats" / "00004.json").write_text(json.dumps({"prompts_done": 3}))
    t = run_throughput(tmp_path)
    assert t == {
        "shards_total": 6,
        "shards_done": 3,
        "unreadable_done_markers": 1,
        "shards_with_heartbeat_not_done": 1,
        "output_tokens": 4000,
        "prompts": 40,
        "samples": 160,
        "shard_seconds": 30.0,
        "wall_s": 30.0,
        "output_tokens_per_s": 133.33,
        "prompts_per_s": 1.333,
        "output_tokens_per_shard_s": 133.33,
        "per_shard_tokens_per_s": {"min": 100.0, "mean": 125.0, "max": 150.0},
    }
    empty = run_throughput(tmp_path / "nothing")
    assert empty["shards_done"] == 0 and empty["wall_s"] is None and empty["per_shard_tokens_per_s"] is None


def test_run_directory_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    """A real run (tiny model, 3 shards): every command accepts the run directory as its merged output."""
    from hpcrollout.merge import merge_run
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_task
    from tests.conftest import make_config, make_prompts, write_input

    inp = write_input(tmp_path / "in.parquet", make_prompts(10))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 3})
    rundir = prepare_run(config)
    run_task(rundir.root, 0)
    merged = tmp_path / "merged.parquet"
    merge_run(rundir.root, merged)

    from_dir = analyze(rundir.root, plot=tmp_path / "run.png", batch_rows=4)
    from_file = analyze(merged)
    for key in ("rows", "responses", "response_tokens", "response_chars", "finish_reasons", "diversity", "error_rows"):
        assert from_dir[key] == from_file[key], key
    assert from_dir["rows"] == 10 and from_dir["responses"] == 30
    assert (from_dir["max_tokens"], from_dir["max_tokens_from"]) == (12, "run config")
    t = from_dir["throughput"]
    assert (t["shards_total"], t["shards_done"], t["prompts"], t["samples"]) == (3, 3, 10, 30)
    tokens = pq.read_table(merged, columns=["response_tokens"]).column("response_tokens").to_pylist()
    assert t["output_tokens"] == sum(sum(x) for x in tokens)
    assert t["output_tokens_per_s"] > 0 and "throughput" in format_report(from_dir)

    flatten(rundir.root, tmp_path / "flat.parquet")
    assert pq.read_table(tmp_path / "flat.parquet").num_rows == 30
    r = filter_file(rundir.root, tmp_path / "f.parquet", Criteria(max_length=12, unit="tokens"))
    assert (r.rows_out, r.responses_out) == (10, 30)
    # An unfinished run: refused by default (the merge names the missing shard), analyzed so far with partial.
    rundir.done_marker(2).unlink()
    with pytest.raises(HpcRolloutError):
        analyze(rundir.root)
    part = analyze(rundir.root, partial=True)
    assert 0 < part["rows"] < 10 and part["throughput"]["shards_done"] == 2
    rundir.done_marker(2).write_text(json.dumps({"shard": 2}))
    e = export_jsonl(rundir.root, tmp_path / "sft.jsonl", fmt="messages")
    assert e.records_out == 30
    first = json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]][-2:] == ["user", "assistant"]


def test_flattened_without_uid(tmp_path: Path) -> None:
    flat = tmp_path / "f.parquet"
    flatten(write_merged(tmp_path / "m.parquet"), flat)
    pq.write_table(pq.read_table(flat).drop_columns(["uid"]), tmp_path / "nouid.parquet")
    report = analyze(tmp_path / "nouid.parquet", plot=tmp_path / "p.png")
    assert (report["rows"], report["responses"], report["error_rows"]) == (12, 11, 1)
    assert report["prompts"] is None and report["diversity"] is None
    assert report["response_chars"] == EXPECTED["response_chars"]
    assert "diversity" not in format_report(report)
