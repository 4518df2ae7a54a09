"""pass@k against a direct computation, maj@n, solve rates, --by; filter by score and solve rate; analyze output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.analyze import analyze, format_report
from hpcrollout.errors import HpcRolloutError
from hpcrollout.export import export_jsonl
from hpcrollout.filter import Criteria, filter_file
from hpcrollout.flatten import flatten
from hpcrollout.scoring.metrics import k_values, parse_solve_rate, pass_at_k
from hpcrollout.scoring.score import DETAILS_FIELD, SCORES_FIELD
from tests.scoring_helpers import merged_table


def _detail(answer: str | None, status: str = "ok") -> dict[str, Any]:
    return {"answer": answer, "status": status, "message": None}


# Prompt -> (scores, extracted answers); data_source for --by. Correct means score >= 1.
PROMPTS: list[dict[str, Any]] = [
    # 2 of 4 correct; answers 5,5,7,7: a tie, the first seen (5, correct) wins the vote
    {"src": "gsm", "scores": [1.0, 1.0, 0.0, 0.0], "answers": ["5", "5", "7", "7"]},
    # 1 of 4 correct; majority 3 (wrong)
    {"src": "gsm", "scores": [0.0, 0.0, 1.0, 0.0], "answers": ["3", "3", "4", None]},
    # never solved
    {"src": "math", "scores": [0.0, 0.0, 0.0, 0.0], "answers": ["1", "2", "3", "4"]},
    # always solved, partial-credit scores above the threshold
    {"src": "math", "scores": [1.0, 1.5, 1.0, 1.0], "answers": ["9", "9", "9", "9"]},
    # no reference: null scores, not counted in pass@k or solve rates
    {"src": "math", "scores": [None, None, None, None], "answers": [None] * 4, "status": "no_reference"},
    # an error row: no responses
    {"src": "gsm", "scores": [], "answers": [], "error": "prompt too long"},
    # 3 of 4, scores 0.5 count as incorrect
    {"src": "math", "scores": [1.0, 0.5, 1.0, 1.0], "answers": ["2", "1", "2", "2"]},
]


def scored_file(path: Path, prompts: list[dict[str, Any]] = PROMPTS, row_group_size: int = 2) -> Path:
    rows = []
    for i, p in enumerate(prompts):
        n = len(p["scores"])
        rows.append(
            {
                "data_source": p["src"],
                "answer": "x",
                "responses": [f"response {i}.{k}" for k in range(n)],
                "error": p.get("error"),
            }
        )
    table = merged_table(rows)
    table = table.append_column(SCORES_FIELD, pa.array([p["scores"] for p in prompts], SCORES_FIELD.type))
    details = [[_detail(a, p.get("status", "ok")) for a in p["answers"]] for p in prompts]
    table = table.append_column(DETAILS_FIELD, pa.array(details, DETAILS_FIELD.type))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _direct_pass_at_k(correct: list[bool], k: int) -> float:
    """The probability that a random k-subset of the n samples holds a correct one, by enumeration."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_direct_pass_at_k(correct, k), abs=1e-12), (n, c, k)
    # The naive "any of the first k" differs: 1 correct of 4, first k=2 samples both wrong -> 0, unbiased 0.5
    assert pass_at_k(4, 1, 2) == 0.5
    assert k_values(8) == [1, 2, 4, 8] and k_values(6) == [1, 2, 4, 6] and k_values(1) == [1] and k_values(0) == []
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


@pytest.mark.parametrize("batch_rows", [None, 1, 3])
def test_analyze_scoring_merged_and_flattened(tmp_path: Path, batch_rows: int | None) -> None:
    src = scored_file(tmp_path / "s.parquet")
    flat = tmp_path / "flat.parquet"
    flatten(src, flat)
    merged = analyze(src, batch_rows=batch_rows, by="data_source")["scoring"]
    assert analyze(flat, batch_rows=batch_rows, by="data_source")["scoring"] == merged

    correct = [[s is not None and s >= 1.0 for s in p["scores"]] for p in PROMPTS]
    scored = [c for c, p in zip(correct, PROMPTS, strict=True) if p["scores"] and p["scores"][0] is not None]
    for k in (1, 2, 4):
        expected = np.mean([_direct_pass_at_k(c, k) for c in scored])
        assert merged["pass_at_k"][str(k)]["value"] == pytest.approx(expected, abs=1e-6)
        assert merged["pass_at_k"][str(k)]["prompts"] == 5
    assert list(merged["pass_at_k"]) == ["1", "2", "4"]
    # maj@4: prompts 0 (tie -> 5, correct), 3 (9) and 6 (2) vote right; 1 (3) and 2 (1, first seen) vote wrong
    assert merged["maj_at_n"] == {"n": 4, "value": 0.6, "prompts": 5}
    assert merged["solve_rate"] == {"0/4": 1, "1/4": 1, "2/4": 1, "3/4": 1, "4/4": 1}
    assert (merged["never_solved"], merged["always_solved"]) == (1, 1)
    assert (merged["prompts"], merged["scored_prompts"], merged["unscored_prompts"]) == (7, 5, 2)
    assert (merged["responses"], merged["scored_responses"]) == (24, 20)
    assert merged["mean_score"] == pytest.approx(11 / 20)
    assert merged["accuracy"] == pytest.approx(10 / 20)
    assert merged["statuses"] == {"ok": 20, "no_reference": 4}
    gsm, math_ = merged["groups"]["gsm"], merged["groups"]["math"]
    assert (gsm["prompts"], gsm["scored_prompts"], math_["prompts"], math_["scored_prompts"]) == (3, 2, 4, 3)
    assert gsm["pass_at_k"]["1"]["value"] == pytest.approx((0.5 + 0.25) / 2)
    assert gsm["maj_at_n"]["value"] == 0.5 and math_["maj_at_n"]["value"] == pytest.approx(2 / 3)


def test_threshold_report_and_plot(tmp_path: Path) -> None:
    src = scored_file(tmp_path / "s.parquet")
    r = analyze(src, plot=tmp_path / "p.png", correct_threshold=0.5)
    s = r["scoring"]
    assert s["threshold"] == 0.5 and s["solve_rate"]["4/4"] == 2  # the 0.5 scores now count
    assert (tmp_path / "p.png").stat().st_size > 10_000
    text = format_report(analyze(src, by="data_source"))
    assert "pass@1 50.0%  @2 66.7%  @4 80.0%   maj@4 60.0%" in text
    assert "correct/n: 0/4 x 1  1/4 x 1  2/4 x 1  3/4 x 1  4/4 x 1" in text
    assert "never solved 1, always solved 1" in text and "  by data_source" in text
    json.dumps(r)  # the report is JSON as it is


def test_analyze_bad_by(tmp_path: Path) -> None:
    src = scored_file(tmp_path / "s.parquet")
    with pytest.raises(HpcRolloutError, match=r"has no column 'topic' \(needed for --by\)"):
        analyze(src, by="topic")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(src).drop_columns(["scores", "score_details"]), plain)
    assert "scoring" not in analyze(plain)
    with pytest.raises(HpcRolloutError, match=r"has no scores, so --by.*hpcrollout score"):
        analyze(plain, by="data_source")


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def test_filter_correct_incorrect_min_score(tmp_path: Path) -> None:
    src = scored_file(tmp_path / "s.parquet")
    out = tmp_path / "out.parquet"
    r = filter_file(src, out, Criteria(correct=True))
    assert (r.rows_out, r.responses_out) == (7, 10)  # rows stay (fewer responses) unless --drop_empty_rows
    rows = _rows(out)
    assert rows[0]["responses"] == ["response 0.0", "response 0.1"] and rows[0]["scores"] == [1.0, 1.0]
    assert [d["answer"] for d in rows[6]["score_details"]] == ["2", "2", "2"]
    assert rows[4]["responses"] == [] and rows[5]["error"] == "prompt too long"
    r = filter_file(src, out, Criteria(correct=False, drop_empty_rows=True))
    assert (r.rows_out, r.responses_out) == (4, 10)  # null scores are neither correct nor incorrect
    assert [row["responses"] for row in _rows(out)][-1] == ["response 6.1"]
    r = filter_file(src, out, Criteria(min_score=1.2))
    assert r.responses_out == 1 and _rows(out)[3]["scores"] == [1.5]
    r = filter_file(src, out, Criteria(correct=True, correct_threshold=0.5))
    assert r.responses_out == 11


def test_filter_solve_rate(tmp_path: Path) -> None:
    src = scored_file(tmp_path / "s.parquet", row_group_size=3)
    out = tmp_path / "out.parquet"
    r = filter_file(src, out, Criteria(solve_rate=parse_solve_rate("0.1:0.9")))
    assert [row["qid"] for row in _rows(out)] == ["q0", "q1", "q6"] and r.responses_out == 12
    # The solve rate is the prompt's, before response filters: --correct then keeps the correct ones of those
    filter_file(src, out, Criteria(solve_rate=(0.5, 1.0), correct=True))
    assert [(row["qid"], len(row["responses"])) for row in _rows(out)] == [("q0", 2), ("q3", 4), ("q6", 3)]
    filter_file(src, out, Criteria(solve_rate=parse_solve_rate(":0")))
    assert [row["qid"] for row in _rows(out)] == ["q2"]
    for bad in ("0.9:0.1", "0.5", "a:b", "0:2"):
        with pytest.raises(HpcRolloutError, match=r"--solve_rate .*expected LO:HI"):
            parse_solve_rate(bad)
    flat = tmp_path / "flat.parquet"
    flatten(src, flat)
    for batch_rows in (None, 1, 3, 5):  # prompts cut across batches are put back together
        filter_file(flat, out, Criteria(solve_rate=(0.1, 0.9)), batch_rows=batch_rows)
        assert [(row["qid"], row["sample_index"]) for row in _rows(out)] == [
            (q, i) for q in ("q0", "q1", "q6") for i in range(4)
        ], batch_rows
    filter_file(flat, out, Criteria(solve_rate=(0.5, 1.0), correct=True), batch_rows=2)
    assert [(row["qid"], row["sample_index"]) for row in _rows(out)] == [
        ("q0", 0),
        ("q0", 1),
        ("q3", 0),
        ("q3", 1),
        ("q3", 2),
        ("q3", 3),
        ("q6", 0),
        ("q6", 2),
        ("q6", 3),
    ]
    r = filter_file(flat, out, Criteria(correct=True))
    assert r.responses_out == 10 and r.error_rows_out == 1  # error records are kept unless --drop_errors
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(src).drop_columns(["scores", "score_details"]), plain)
    with pytest.raises(HpcRolloutError, match=r"has no 'scores' column, needed for --min_score.*hpcrollout score"):
        filter_file(plain, out, Criteria(correct=True))


def test_rejection_sampled_sft_export(tmp_path: Path) -> None:
    src = scored_file(tmp_path / "s.parquet")
    kept = tmp_path / "kept.parquet"
    filter_file(src, kept, Criteria(correct=True, solve_rate=(0.1, 0.9)))
    r = export_jsonl(kept, tmp_path / "sft.jsonl", fmt="messages")
    lines = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert r.records_out == len(lines) == 6  # q0: 2, q1: 1, q6: 3
    assert all(rec["score"] >= 1.0 for rec in lines)
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": "response 0.0"}
    assert lines[0]["uid"] == "u0" and lines[2]["uid"] == "u1"
