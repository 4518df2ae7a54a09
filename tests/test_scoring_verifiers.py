"""Verifiers on hand-made responses with known answers; the pool's soft and hard timeouts and dead workers."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from hpcrollout.errors import HpcRolloutError
from hpcrollout.scoring.pool import VerifierPool, default_workers
from hpcrollout.scoring.verifiers import (
    BAD_REFERENCE,
    ERROR,
    NO_ANSWER,
    NO_REFERENCE,
    OK,
    TIMEOUT,
    VerifierSpec,
    choice_letter,
    last_boxed,
    normalize,
)
from tests.scoring_helpers import write_user_module


def _score(text: str, responses: list[str | None], reference, row=None, timeout: float = 5.0):  # noqa: ANN001
    return VerifierSpec(text, "answer").build().score_row(responses, reference, row, timeout)


def _scores(outcomes) -> list[float | None]:  # noqa: ANN001
    return [o.score for o in outcomes]


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    write_user_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")  # spawned workers import it too
    return "user_verifiers"


def test_math_equivalent_forms() -> None:
    pytest.importorskip("math_verify")
    equivalent = [
        "The answer is \\boxed{0.5}",
        "So $x = \\frac{1}{2}$.\n\nThe final answer is $\\frac{2}{4}$.",
        "\\boxed{\\frac12}",
        "Therefore the answer is 1/2",
        "\\boxed{\\dfrac{1}{2}}",
    ]
    out = _score("math", equivalent, "\\frac{1}{2}")
    assert _scores(out) == [1.0] * len(equivalent), out
    assert [o.answer for o in out] == ["1/2"] * len(equivalent)  # one vote for maj@n: 0.5 is 1/2
    # Sets in any order, intervals, units stripped, a numeric reference.
    assert _scores(_score("math", ["\\boxed{\\{3, 1, 2\\}}", "\\boxed{\\{1,2\\}}"], "\\{1,2,3\\}")) == [1.0, 0.0]
    assert _scores(_score("math", ["\\boxed{(0, 1]}", "\\boxed{[0,1]}"], "(0,1]")) == [1.0, 0.0]
    assert _scores(_score("math", ["The answer is \\boxed{5\\text{ cm}}"], 5)) == [1.0]
    assert _scores(_score("math", ["\\boxed{12}", "\\boxed{13}"], ["12", "twelve"])) == [1.0, 0.0]


def test_math_wrong_unparseable_and_references() -> None:
    pytest.importorskip("math_verify")
    out = _score("math", ["\\boxed{3}", "I do not know.", None], "2")
    assert [(o.score, o.status) for o in out] == [(0.0, OK), (0.0, NO_ANSWER), (None, ERROR)]
    assert out[0].answer == "3"
    assert {o.status for o in _score("math", ["\\boxed{2}"], None)} == {NO_REFERENCE}
    assert _score("math", ["\\boxed{2}"], None)[0].score is None
    # A reference math-verify cannot parse falls back to its text: compared as a string, never a crash.
    assert [(o.score, o.status) for o in _score("math", ["\\boxed{2}"], "???")] == [(0.0, OK)]
    wrong_type = _score("math", ["\\boxed{2}"], {"x": 1})
    assert wrong_type[0].status == BAD_REFERENCE and "got dict" in wrong_type[0].message


def test_math_pathological_answer_times_out() -> None:
    """9^(9^(9^9)) sends sympy into a huge integer power: the per-response timeout ends it, the next one scores."""
    pytest.importorskip("math_verify")
    _score("math", ["\\boxed{1}"], "1")  # math-verify and sympy imported before the clock starts
    started = time.monotonic()
    out = _score("math", ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{4}"], "4", timeout=2.0)
    assert time.monotonic() - started < 60
    assert out[0].status == TIMEOUT and out[0].score == 0.0 and "2 s" in out[0].message
    assert (out[1].score, out[1].status) == (1.0, OK)


def test_exact_regex_choice() -> None:
    out = _score("exact", ["Paris", "the answer is  PARIS.", "\\boxed{\\text{Paris}}", "London", ""], "paris")
    assert _scores(out) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out[3].answer == "london"
    solution = "We add the two numbers, so the result is $\\boxed{Paris}$."  # a worked solution as the reference
    assert _scores(_score("exact", ["\\boxed{paris}", "Paris", "Rome"], solution)) == [1.0, 1.0, 0.0]
    gsm = "regex:####\\s*(-?[\\d,]+)"
    out = _score(gsm, ["so 6*7 = 42\n#### 42", "#### 41", "no marker, 42", "#### 1\n#### 42"], 42)
    assert [(o.score, o.status) for o in out] == [(1.0, OK), (0.0, OK), (0.0, NO_ANSWER), (1.0, OK)]
    named = _score("regex:ANSWER=(?P<answer>\\w+)", ["x ANSWER=yes"], "YES")
    assert _scores(named) == [1.0]
    out = _score(
        "choice",
        ["The answer is (B).", "\\boxed{B}", "B", "I pick C.", "Answer: b", "Maybe (A) or (C)... no idea", "hmm"],
        "B",
    )
    assert _scores(out) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert out[6].status == NO_ANSWER and out[5].answer == "C"
    assert _score("choice", ["(B)"], "B) the second option")[0].score == 1.0
    assert _score("choice", ["(B)"], "forty-two")[0].status == BAD_REFERENCE
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert normalize("  $The  Answer.$ ") == "the answer"
    assert choice_letter("A") == "A" and choice_letter("no letter here") is None


def test_python_verifier(user_module: str, tmp_path: Path) -> None:
    rows = {"answer": 7}
    out = _score(f"python:{user_module}:contains_reference", ["it is 7", "it is 8"], 7, rows)
    assert _scores(out) == [1.0, 0.0]
    out = _score(f"python:{user_module}:with_answer", ["3 then 7", "none"], 7, rows)
    assert [(o.score, o.answer) for o in out] == [(1.0, "7"), (0.0, None)]
    out = _score(f"python:{user_module}:raises", ["fine", "boom!"], 1, rows)
    assert [(o.score, o.status) for o in out] == [(1.0, OK), (0.0, ERROR)]
    assert out[1].message == "ValueError: boom in boom!"
    out = _score(f"python:{user_module}:returns_text", ["x"], 1, rows)
    assert out[0].status == ERROR and "returned str, expected float or bool" in out[0].message
    out = _score(f"python:{user_module}:sleeps", ["slow", "fast"], 1, rows, timeout=3.0)
    assert [o.status for o in out] == [TIMEOUT, OK]
    # By file path too; no reference column: every row is scored.
    spec = VerifierSpec(f"python:{tmp_path / 'user_verifiers.py'}:by_length", None)
    assert _scores(spec.build().score_row(["12345"], None, {}, 5.0)) == [0.5]


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(HpcRolloutError, match=r"module 'no_such_module_xyz' does not import \(ModuleNotFoundError"):
        VerifierSpec("python:no_such_module_xyz:f", None).build()
    (tmp_path / "broken_mod.py").write_text("import nonexistent_dependency_abc\n")
    with pytest.raises(HpcRolloutError, match=r"broken_mod.py' does not import .*nonexistent_dependency_abc"):
        VerifierSpec(f"python:{tmp_path / 'broken_mod.py'}:f", None).build()
    (tmp_path / "ok_mod.py").write_text("x = 1\n")
    with pytest.raises(HpcRolloutError, match=r"has no function 'f'"):
        VerifierSpec(f"python:{tmp_path / 'ok_mod.py'}:f", None).build()
    with pytest.raises(HpcRolloutError, match=r"regex:\(unclosed: not a valid regular expression"):
        VerifierSpec("regex:(unclosed", "a").build()
    with pytest.raises(HpcRolloutError, match=r"--verifier 'fuzzy': expected one of math, exact"):
        VerifierSpec("fuzzy", "a").build()


def test_math_without_math_verify_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    with pytest.raises(HpcRolloutError, match=r"pip install 'hpcrollout\[score\]'"):
        VerifierSpec("math", "answer").build()
    assert VerifierSpec("exact", "answer").build().name == "exact"  # the rest works without it


def _chunks(responses: list[str]) -> list[list[tuple]]:
    return [[([r], 1, {"answer": 1})] for r in responses]


def test_pool_hard_timeout_kills_a_worker_stuck_in_c(user_module: str) -> None:
    """A verifier stuck in C code ignores SIGALRM: its worker is killed, the response recorded, the rest scored."""
    spec = VerifierSpec(f"python:{user_module}:hangs_in_c", "answer")
    rows = [(["ok", "hang", "ok too"], 1, {"answer": 1}), (["fine"], 1, {"answer": 1})]
    with VerifierPool(spec, workers=2, timeout_s=2.0, hard_timeout_s=6.0) as pool:
        started = time.monotonic()
        results = list(pool.imap([rows, *_chunks(["a", "b", "c"])]))
        assert time.monotonic() - started < 60
        assert pool.killed == 1
    first = results[0]
    assert [o.status for o in first] == [OK, TIMEOUT, OK, OK]
    assert "worker was killed after 6 s" in first[1].message
    assert [r[0].status for r in results[1:]] == [OK, OK, OK]


def test_pool_soft_timeout_swallowed_and_dead_worker(user_module: str) -> None:
    spec = VerifierSpec(f"python:{user_module}:swallows_everything", "answer")
    with VerifierPool(spec, workers=1, timeout_s=2.0, hard_timeout_s=5.0) as pool:
        out = list(pool.imap(_chunks(["stubborn", "fine"])))
    assert [o[0].status for o in out] == [TIMEOUT, OK]
    spec = VerifierSpec(f"python:{user_module}:dies", "answer")
    with VerifierPool(spec, workers=2, timeout_s=5) as pool:
        out = list(pool.imap([[(["a", "die", "b"], 1, {"answer": 1})], *_chunks(["c"])]))
        assert pool.killed == 1
    assert [o.status for o in out[0]] == [OK, ERROR, OK]
    assert out[0][1].message == "the verifier process died (exit 3) while scoring this response"
    assert out[1][0].status == OK


def test_pool_results_in_order_and_init_error(user_module: str, tmp_path: Path) -> None:
    spec = VerifierSpec(f"python:{user_module}:by_length", None)
    chunks = [[(["x" * i], None, {})] for i in range(40)]
    with VerifierPool(spec, workers=2, timeout_s=5, max_in_flight=3) as pool:
        got = [c[0].score for c in pool.imap(chunks)]
    assert got == [i / 10 for i in range(40)]
    # A module that imports here but not in the workers (as when a node lacks a dependency).
    (tmp_path / "parent_only_mod.py").write_text(
        "import multiprocessing\n"
        "if multiprocessing.current_process().name != 'MainProcess':\n"
        "    raise ImportError('no such dependency on this node')\n"
        "def f(response, row):\n    return 1\n"
    )
    spec = VerifierSpec(f"python:{tmp_path / 'parent_only_mod.py'}:f", None)
    spec.build()
    with (
        pytest.raises(HpcRolloutError, match=r"could not build the verifier: .*no such dependency on this node"),
        VerifierPool(spec, workers=1, timeout_s=5),
    ):
        pass


def test_default_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert default_workers() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert default_workers() >= 1


def test_regex_catastrophic_backtracking_times_out() -> None:
    out = _score("regex:(a+)+$", ["a" * 40 + "b", "aaa"], "aaa", timeout=2.0)
    assert [o.status for o in out] == [TIMEOUT, OK] and out[1].score == 1.0
