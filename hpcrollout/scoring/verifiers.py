"""Verifiers: check one row's responses against its reference answer, one outcome per response.

Built in (``--verifier``):
  math                    the final answer (``\\boxed{}``, "the answer is ...", a last expression) checked for
                          mathematical equivalence with the reference by HF's math-verify (1/2 = 0.5 = \\frac{1}{2},
                          sets, intervals, units stripped); needs ``pip install 'hpcrollout[score]'``
  exact                   normalized string match of the answer (last ``\\boxed{}``, else the text after the last
                          "answer is" / "Answer:", else the whole response) with the reference
  regex:PATTERN           the last match of PATTERN (its group ``answer``, else group 1, else the whole match),
                          normalized, compared with the reference
  choice                  a multiple-choice letter (A-Z) extracted from the response, compared with the reference
  python:MODULE:FUNCTION  ``FUNCTION(response: str, row: dict) -> float | bool`` (or ``(score, answer)``);
                          MODULE is a dotted module on the Python path or a ``.py`` file; imported in each worker

Invariants:
- One outcome per response, ``(score, answer, status, message)``, never an exception: a verifier that raises gives
  status ``error`` with the exception's text, a response not scored within the timeout gives ``timeout``, a
  response with nothing to extract gives ``no_answer``; all three score 0.0. A row without a reference gives
  ``no_reference`` with a null score (it cannot be judged, so pass@k and solve rates leave it out), a reference
  the verifier cannot read gives ``bad_reference`` (null score).
- A reference is a string, a number, or a list of them (any one may match). It is parsed once per row.
- The soft timeout is SIGALRM in the calling thread (the pool's workers call from their main thread); a
  verifier stuck in C code ignores it, and the pool's hard timeout kills the worker instead (pool.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hpcrollout.errors import HpcRolloutError

log = logging.getLogger("hpcrollout")

# Outcome statuses.
OK = "ok"
NO_ANSWER = "no_answer"
TIMEOUT = "timeout"
ERROR = "error"
NO_REFERENCE = "no_reference"
BAD_REFERENCE = "bad_reference"
STATUSES = (OK, NO_ANSWER, TIMEOUT, ERROR, NO_REFERENCE, BAD_REFERENCE)

BUILTIN = ("math", "exact", "choice", "regex:PATTERN", "python:MODULE:FUNCTION")
MAX_MESSAGE_CHARS = 500
MAX_ANSWER_CHARS = 1000


class Outcome(NamedTuple):
    """What a verifier says about one response."""

    score: float | None
    answer: str | None  # the extracted answer, canonical form (maj@n votes over it)
    status: str
    message: str | None


class VerifierTimeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException, so a verifier's ``except Exception`` cannot swallow it."""


@contextlib.contextmanager
def soft_timeout(seconds: float | None) -> Iterator[None]:
    """Raise VerifierTimeout in this thread after ``seconds`` (main thread only; elsewhere a no-op)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise VerifierTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_outcome(exc: BaseException) -> Outcome:
    return Outcome(0.0, None, ERROR, _clip(f"{type(exc).__name__}: {exc}", MAX_MESSAGE_CHARS))


def timeout_outcome(seconds: float | None, how: str = "") -> Outcome:
    return Outcome(0.0, None, TIMEOUT, f"not scored within {seconds:g} s{how}")


# ---------------------------------------------------------------------------------------------- references


def reference_values(value: Any) -> list[str] | None:
    """A row's reference as the list of acceptable answers (None: the row has none)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        out = [v for item in value if (v := _one_reference(item)) is not None]
        return out or None
    one = _one_reference(value)
    return None if one is None else [one]


def _one_reference(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return None if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return value if value.strip() else None
    raise TypeError(f"a reference must be a string, a number or a list of them, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- text helpers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARK = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def final_answer_text(text: str) -> str:
    """The answer part of a response: last boxed, else after the last 'answer is'/'Answer:', else all of it."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].strip()
        return rest.splitlines()[0] if rest else ""
    return text


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, ``$``/``\\text{}`` wrappers, quotes and a final period removed."""
    s = _TEXT_WRAP.sub(r"\1", text).strip()
    s = s.strip("$").strip()
    s = _SPACES.sub(" ", s).casefold()
    s = s.rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


# ---------------------------------------------------------------------------------------------- verifiers


class Verifier:
    """Scores one row's responses; subclasses implement ``prepare`` (the reference) and ``check`` (a response)."""

    name = ""
    needs_reference = True
    needs_row = False

    def prepare(self, references: list[str]) -> Any:
        """Parse the reference once per row; raise to mark the row ``bad_reference``.

        The answer part of each (a worked solution's last ``\\boxed{}``), normalized.
        """
        return [normalize(final_answer_text(r)) for r in references]

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        raise NotImplementedError

    def score_row(
        self,
        responses: Sequence[str | None],
        reference: Any,
        row: dict[str, Any] | None,
        timeout_s: float | None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Outcome]:
        """One outcome per response; ``progress(i)`` is called before response i (-1: before the reference)."""
        prepared: Any = None
        if self.needs_reference:
            try:
                refs = reference_values(reference)
            except TypeError as exc:
                return [Outcome(None, None, BAD_REFERENCE, str(exc))] * len(responses)
            if refs is None:
                return [Outcome(None, None, NO_REFERENCE, "the row has no reference answer")] * len(responses)
            if progress:
                progress(-1)
            try:
                with soft_timeout(timeout_s):
                    prepared = self.prepare(refs)
            except VerifierTimeout:
                msg = f"reading the reference {_clip(repr(refs), 200)} took more than {timeout_s:g} s"
                return [Outcome(None, None, BAD_REFERENCE, msg)] * len(responses)
            except Exception as exc:  # noqa: BLE001 - a per-row detail, not a crash
                msg = _clip(f"cannot read the reference {refs!r}: {type(exc).__name__}: {exc}", MAX_MESSAGE_CHARS)
                return [Outcome(None, None, BAD_REFERENCE, msg)] * len(responses)
        out = []
        for i, response in enumerate(responses):
            if progress:
                progress(i)
            if response is None:
                out.append(Outcome(None, None, ERROR, "null response"))
                continue
            try:
                with soft_timeout(timeout_s):
                    outcome = self.check(response, prepared, row)
            except VerifierTimeout:
                outcome = timeout_outcome(timeout_s)
            except Exception as exc:  # noqa: BLE001 - a per-response detail
                outcome = error_outcome(exc)
            out.append(outcome)
        return out


def _matched(answer: str, prepared: list[str], raw: str | None = None) -> Outcome:
    shown = _clip(raw if raw is not None else answer, MAX_ANSWER_CHARS)
    return Outcome(1.0 if answer in prepared else 0.0, shown, OK, None)


class ExactVerifier(Verifier):
    name = "exact"

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        return _matched(normalize(final_answer_text(response)), prepared)


class RegexVerifier(Verifier):
    name = "regex"

    def __init__(self, pattern: str) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise HpcRolloutError(f"--verifier regex:{pattern}: not a valid regular expression ({exc})") from None
        self.group: int | str = (
            "answer" if "answer" in self.pattern.groupindex else 1 if self.pattern.groups >= 1 else 0
        )

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        last = None
        for last in self.pattern.finditer(response):  # noqa: B007 - the last match is wanted
            pass
        if last is None or last.group(self.group) is None:
            return Outcome(0.0, None, NO_ANSWER, f"no match of {self.pattern.pattern!r}")
        return _matched(normalize(last.group(self.group)), prepared)


_CHOICE_STRICT = [
    re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{)?\s*\(?([A-Za-z])\)?\s*\}?"),
    re.compile(r"(?:final answer|answer|option|choice)\s*(?:is|:)?\s*:?\s*\**\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.I),
]
_CHOICE_LOOSE = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]?\s*$"),  # the whole response is one letter
    re.compile(r"\(([A-Z])\)"),  # the last "(C)"
    re.compile(r"(?<![A-Za-z])([A-Z])(?:[.):]|$)"),  # the last "C." / "C)" / "C:"
]


def choice_letter(text: str) -> str | None:
    """The chosen letter of a multiple-choice response (upper case), or None."""
    for patterns in (_CHOICE_STRICT, _CHOICE_LOOSE):
        for p in patterns:
            found = p.findall(text)
            if found:
                return found[-1].upper()
    return None


class ChoiceVerifier(Verifier):
    name = "choice"

    def prepare(self, references: list[str]) -> Any:
        letters = []
        for r in references:
            m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*(?:[.:)].*)?", r, re.S)
            if not m:
                raise ValueError(f"{r!r} is not a choice letter (A, B, C, ...)")
            letters.append(m.group(1).upper())
        return letters

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        letter = choice_letter(response)
        if letter is None:
            return Outcome(0.0, None, NO_ANSWER, "no choice letter found")
        return _matched(letter, prepared)


MATH_EXTRA_HINT = "the math verifier needs math-verify: pip install 'hpcrollout[score]' (or: pip install math-verify)"


def import_math_verify() -> Any:
    """math_verify, with its own signal-based timeouts silenced (ours cover parse + verify together)."""
    try:
        import math_verify
    except ImportError as exc:
        raise HpcRolloutError(f"{MATH_EXTRA_HINT} ({exc})") from None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


class MathVerifier(Verifier):
    name = "math"

    def __init__(self) -> None:
        mv = import_math_verify()
        self._parse = mv.parse
        self._verify = mv.verify
        self._gold_config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]

    def _parse_one(self, text: str) -> list[Any]:
        # parsing_timeout/timeout_seconds None: math-verify's SIGALRM would cancel ours (one timer per process).
        return self._parse(text, parsing_timeout=None)

    def prepare(self, references: list[str]) -> Any:
        golds = []
        for r in references:
            # A bare reference ("\frac{1}{2}", "\{1,2\}") parses as LaTeX once put in math mode.
            has_delims = "$" in r or "\\boxed" in r or "\\(" in r or "\\[" in r
            parsed = self._parse_one(r if has_delims else f"${r}$")
            if not parsed and not has_delims:
                parsed = self._parse_one(r)
            if not parsed:
                raise ValueError(f"math-verify cannot parse {_clip(r, 200)!r}")
            golds.append(parsed)
        return golds

    @staticmethod
    def _canonical(expr: Any) -> str:
        """The answer as majority voting counts it: 0.5 and 1/2 are one vote (a float becomes its rational)."""
        if getattr(expr, "is_Float", False):
            from sympy import Rational

            return str(Rational(str(expr)).limit_denominator(10**12))
        return str(expr)

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        parsed = self._parse_one(response)
        if not parsed:
            return Outcome(0.0, None, NO_ANSWER, "no final answer found")
        answer = _clip(self._canonical(parsed[0]), MAX_ANSWER_CHARS)
        ok = any(self._verify(gold, parsed, timeout_seconds=None) for gold in prepared)
        return Outcome(1.0 if ok else 0.0, answer, OK, None)


class PythonVerifier(Verifier):
    name = "python"
    needs_row = True

    def __init__(self, module: str, function: str, reference_column: str | None) -> None:
        self.function = load_user_function(module, function)
        self.where = f"{module}:{function}"
        self.needs_reference = reference_column is not None

    def prepare(self, references: list[str]) -> Any:
        return references

    def check(self, response: str, prepared: Any, row: dict[str, Any] | None) -> Outcome:
        value = self.function(response, row if row is not None else {})
        answer = None
        if isinstance(value, tuple) and len(value) == 2:
            value, answer = value
            answer = None if answer is None else _clip(str(answer), MAX_ANSWER_CHARS)
        if isinstance(value, bool) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            score = float(value)
            if math.isnan(score):
                return Outcome(0.0, answer, ERROR, f"{self.where} returned NaN")
            return Outcome(score, answer, OK, None)
        if hasattr(value, "__float__") and not isinstance(value, (str, bytes)):  # numpy scalars
            return Outcome(float(value), answer, OK, None)
        return Outcome(0.0, answer, ERROR, f"{self.where} returned {type(value).__name__}, expected float or bool")


def load_user_function(module: str, function: str) -> Callable[[str, dict[str, Any]], Any]:
    """Import MODULE (dotted name or .py path) and return its FUNCTION, or raise naming what failed."""
    where = f"python:{module}:{function}"
    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            if not path.is_file():
                raise HpcRolloutError(f"--verifier {where}: {path} does not exist")
            name = f"hpcrollout_user_verifier_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except HpcRolloutError:
        raise
    except Exception as exc:
        raise HpcRolloutError(
            f"--verifier {where}: module {module!r} does not import ({type(exc).__name__}: {exc}); "
            "it must be importable in every worker (on PYTHONPATH, installed, or given as a path to a .py file)"
        ) from None
    fn = getattr(mod, function, None)
    if fn is None or not callable(fn):
        raise HpcRolloutError(f"--verifier {where}: module {module!r} has no function {function!r}")
    return fn


@dataclass(frozen=True)
class VerifierSpec:
    """What to build in each worker: picklable, so it crosses into spawned processes."""

    text: str  # as given on the command line
    reference: str | None  # the reference column (python verifiers may have none)

    def build(self) -> Verifier:
        kind, _, arg = self.text.partition(":")
        if kind == "math" and not arg:
            return MathVerifier()
        if kind == "exact" and not arg:
            return ExactVerifier()
        if kind == "choice" and not arg:
            return ChoiceVerifier()
        if kind == "regex" and arg:
            return RegexVerifier(arg)
        if kind == "python":
            module, _, function = arg.rpartition(":")
            if module and function:
                return PythonVerifier(module, function, self.reference)
        raise HpcRolloutError(f"--verifier {self.text!r}: expected one of {', '.join(BUILTIN)}")
