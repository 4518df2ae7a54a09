"""What RL and eval people read from a scored file: mean score, pass@k, maj@n, solve rates; and selection masks.

Definitions (a response is *correct* when its score is >= the threshold, 1.0 by default; responses with a null
score, i.e. rows without a usable reference, are not counted anywhere):
- pass@k: the unbiased estimator of the Codex paper (Chen et al. 2021), 1 - C(n-c, k) / C(n, k) for a prompt with
  n scored responses of which c are correct, averaged over the prompts with n >= k. Computed exactly from the
  counts of (n, c) pairs, so memory does not grow with the number of prompts.
- maj@n: the share of prompts whose most frequent extracted answer (ties: the one seen first) is correct, over the
  prompts with at least one extracted answer.
- solve rate: c / n of a prompt; its distribution is reported as prompts per "c/n".
Merged input has one prompt per row; in a flattened file a prompt is a run of consecutive rows with the same uid.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcrollout.errors import HpcRolloutError
from hpcrollout.sources import WholePrompts, prompt_starts

CORRECT_AT = 1.0
MAX_GROUPS = 1000  # distinct --by values reported; the rest go to "(other)"
OTHER = "(other)"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt: 1 - C(n-c, k) / C(n, k) (exact integer arithmetic)."""
    if k > n or k < 1:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself."""
    ks, k = [], 1
    while k <= n_max:
        ks.append(k)
        k *= 2
    if n_max >= 1 and ks[-1] != n_max:
        ks.append(n_max)
    return ks


class ScoreStats:
    """Running totals of one group of prompts."""

    def __init__(self) -> None:
        self.prompts = 0
        self.responses = 0
        self.scored = 0
        self.score_sum = 0.0
        self.correct = 0
        self.nc: Counter[tuple[int, int]] = Counter()  # (scored n, correct c) -> prompts, for prompts with n > 0
        self.maj_prompts = 0
        self.maj_correct = 0
        self.statuses: Counter[str] = Counter()

    def result(self) -> dict[str, Any]:
        n_max = max((n for n, _ in self.nc), default=0)
        passk = {}
        for k in k_values(n_max):
            total = sum(cnt for (n, _), cnt in self.nc.items() if n >= k)
            value = sum(pass_at_k(n, c, k) * cnt for (n, c), cnt in self.nc.items() if n >= k)
            passk[str(k)] = {"value": round(value / total, 6) if total else None, "prompts": total}
        scored_prompts = sum(self.nc.values())
        solve = Counter()
        for (n, c), cnt in self.nc.items():
            solve[(c, n)] += cnt
        return {
            "prompts": self.prompts,
            "responses": self.responses,
            "scored_responses": self.scored,
            "mean_score": round(self.score_sum / self.scored, 6) if self.scored else None,
            "accuracy": round(self.correct / self.scored, 6) if self.scored else None,
            "statuses": dict(self.statuses.most_common()),
            "scored_prompts": scored_prompts,
            "unscored_prompts": self.prompts - scored_prompts,
            "pass_at_k": passk,
            "maj_at_n": {
                "n": n_max,
                "value": round(self.maj_correct / self.maj_prompts, 6) if self.maj_prompts else None,
                "prompts": self.maj_prompts,
            },
            "solve_rate": {f"{c}/{n}": cnt for (c, n), cnt in sorted(solve.items(), key=lambda x: (x[0][1], x[0][0]))},
            "never_solved": sum(cnt for (n, c), cnt in self.nc.items() if c == 0),
            "always_solved": sum(cnt for (n, c), cnt in self.nc.items() if c == n),
        }


def _np_scores(scores: pa.Array) -> np.ndarray:
    return scores.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


class ScoreAnalysis:
    """Score statistics over batches, overall and by the values of one column."""

    def __init__(self, by: str | None = None, threshold: float = CORRECT_AT) -> None:
        self.by = by
        self.threshold = threshold
        self.overall = ScoreStats()
        self.groups: dict[str, ScoreStats] = {}
        self._whole = WholePrompts()  # flattened input: whole prompts, a uid run never split over two batches

    def add_prompts(
        self,
        parent: np.ndarray,
        nprompts: int,
        scores: pa.Array,
        details: pa.Array | None,
        by_values: list[Any] | None,
    ) -> None:
        """Responses (their prompt index ``parent``, score, detail struct) of ``nprompts`` prompts."""
        s = _np_scores(scores)
        valid = ~np.isnan(s)
        correct = valid & (np.nan_to_num(s, nan=-np.inf) >= self.threshold)
        n = np.bincount(parent[valid], minlength=nprompts)
        c = np.bincount(parent[correct], minlength=nprompts)
        maj_has, maj_ok = np.zeros(nprompts, bool), np.zeros(nprompts, bool)
        statuses = None
        if details is not None and len(details):
            answers = pc.struct_field(details, "answer")
            status = pc.struct_field(details, "status")
            statuses = status.fill_null("(none)")
            ok = valid & pc.is_valid(answers).to_numpy(zero_copy_only=False)
            if ok.any():
                codes = pc.dictionary_encode(answers.fill_null("")).indices.to_numpy(zero_copy_only=False)
                width = int(codes.max()) + 1
                idx = np.flatnonzero(ok)
                p = parent[idx].astype(np.int64)
                key = p * width + codes[idx]
                uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
                first = np.full(len(uniq), np.iinfo(np.int64).max)
                np.minimum.at(first, inv, idx)
                anyc = np.zeros(len(uniq), bool)
                np.logical_or.at(anyc, inv, correct[idx])
                up = uniq // width
                order = np.lexsort((first, -counts, up))
                head = np.ones(len(order), bool)
                head[1:] = up[order][1:] != up[order][:-1]
                sel = order[head]
                maj_has[up[sel]] = True
                maj_ok[up[sel]] = anyc[sel]
        groups: list[tuple[ScoreStats, np.ndarray]] = [(self.overall, np.ones(nprompts, bool))]
        if by_values is not None:
            keys = np.array([self._group_key(v) for v in by_values], dtype=object)
            for key in dict.fromkeys(keys.tolist()):
                groups.append((self.groups.setdefault(key, ScoreStats()), keys == key))
        for stats, rows in groups:
            resp = rows[parent] if len(parent) else np.zeros(0, bool)
            stats.prompts += int(rows.sum())
            stats.responses += int(resp.sum())
            stats.scored += int((resp & valid).sum())
            stats.score_sum += float(s[resp & valid].sum())
            stats.correct += int((resp & correct).sum())
            has = rows & (n > 0)
            if has.any():
                width = int(n.max()) + 1
                combo = np.bincount(n[has] * width + c[has])
                for code in np.flatnonzero(combo).tolist():
                    stats.nc[(code // width, code % width)] += int(combo[code])
            stats.maj_prompts += int((rows & maj_has).sum())
            stats.maj_correct += int((rows & maj_has & maj_ok).sum())
            if statuses is not None and resp.any():
                vc = pc.value_counts(statuses.filter(pa.array(resp)))
                for value, cnt in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
                    stats.statuses[value] += cnt

    def _group_key(self, value: Any) -> str:
        key = "(null)" if value is None else str(value)
        if key not in self.groups and len(self.groups) >= MAX_GROUPS:
            return OTHER
        return key

    def add_merged(self, batch: pa.RecordBatch) -> None:
        names = batch.schema.names
        scores_list = batch.column("scores")
        parent = pc.list_parent_indices(scores_list).to_numpy(zero_copy_only=False).astype(np.int64)
        details = pc.list_flatten(batch.column("score_details")) if "score_details" in names else None
        by_values = batch.column(self.by).to_pylist() if self.by else None
        self.add_prompts(parent, batch.num_rows, pc.list_flatten(scores_list), details, by_values)

    def add_flattened(self, batch: pa.RecordBatch | None) -> None:
        """One flattened batch (None: the end, flush the last prompt). Prompts are runs of the same uid."""
        if batch is not None:
            cols = [c for c in ("uid", "response", "score", "score_detail", self.by) if c and c in batch.schema.names]
            table = self._whole.push(pa.Table.from_batches([batch.select(list(dict.fromkeys(cols)))]))
        else:
            table = self._whole.push(None)
        if table is None:
            return
        starts = prompt_starts(table.column("uid").chunk(0))
        group = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        score = table.column("score").combine_chunks()
        detail = table.column("score_detail").combine_chunks() if "score_detail" in table.schema.names else None
        by_values = table.column(self.by).combine_chunks().take(pa.array(first)).to_pylist() if self.by else None
        parent = group.astype(np.int64)
        if "response" in table.schema.names:  # error records (no response) are prompts without responses
            has = pc.is_valid(table.column("response")).to_numpy(zero_copy_only=False)
            if not has.all():
                mask = pa.array(has)
                parent, score = parent[has], score.filter(mask)
                detail = detail.filter(mask) if detail is not None else None
        self.add_prompts(parent, len(first), score, detail, by_values)

    def result(self) -> dict[str, Any]:
        out = {"threshold": self.threshold, **self.overall.result()}
        if self.by:
            out["by"] = self.by
            out["groups"] = {k: v.result() for k, v in sorted(self.groups.items())}
        return out


# ---------------------------------------------------------------------------------------------- selection


def parse_solve_rate(text: str) -> tuple[float, float]:
    """'0.1:0.9' -> (0.1, 0.9); either side may be empty (':0.5' = at most half solved)."""
    lo, sep, hi = text.partition(":")
    try:
        bounds = (float(lo) if lo.strip() else 0.0, float(hi) if hi.strip() else 1.0)
    except ValueError:
        bounds = (-1.0, -1.0)
    if not sep or not (0.0 <= bounds[0] <= bounds[1] <= 1.0):
        raise HpcRolloutError(f"--solve_rate {text!r}: expected LO:HI with 0 <= LO <= HI <= 1, e.g. 0.1:0.9")
    return bounds


def response_score_mask(
    scores: pa.Array, min_score: float | None, correct: bool | None, threshold: float = CORRECT_AT
) -> np.ndarray:
    """Responses passing --min_score and --correct/--incorrect (a null score passes neither)."""
    s = _np_scores(scores)
    keep = np.ones(len(s), bool)
    if min_score is not None:
        keep &= ~np.isnan(s) & (np.nan_to_num(s, nan=-np.inf) >= min_score)
    if correct is not None:
        is_correct = ~np.isnan(s) & (np.nan_to_num(s, nan=-np.inf) >= threshold)
        keep &= is_correct if correct else (~np.isnan(s) & ~is_correct)
    return keep


def row_solve_rate_mask(
    scores_list: pa.Array, bounds: tuple[float, float], threshold: float = CORRECT_AT
) -> np.ndarray:
    """Rows (prompts) whose solve rate c/n is within bounds; rows with no scored response fail."""
    parent = pc.list_parent_indices(scores_list).to_numpy(zero_copy_only=False).astype(np.int64)
    s = _np_scores(pc.list_flatten(scores_list))
    valid = ~np.isnan(s)
    n = np.bincount(parent[valid], minlength=len(scores_list))
    c = np.bincount(parent[valid & (np.nan_to_num(s, nan=-np.inf) >= threshold)], minlength=len(scores_list))
    rate = np.divide(c, n, out=np.full(len(n), -1.0), where=n > 0)
    # A small tolerance: 1/3 must pass --solve_rate 0:0.333... written out by hand as well as 1/3 itself.
    eps = 1e-9
    return (n > 0) & (rate >= bounds[0] - eps) & (rate <= bounds[1] + eps)


# ---------------------------------------------------------------------------------------------- the report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _summary_line(s: dict[str, Any]) -> str:
    passk = "  ".join(f"@{k} {_pct(v['value'])}" for k, v in s["pass_at_k"].items())
    maj = s["maj_at_n"]
    mean = "-" if s["mean_score"] is None else f"{s['mean_score']:.4f}"
    return (
        f"mean score {mean}   correct {_pct(s['accuracy'])}   pass{passk or ' -'}   maj@{maj['n']} {_pct(maj['value'])}"
    )


def format_scoring(s: dict[str, Any]) -> list[str]:
    """The scoring lines of the analyze report."""
    lines = [
        f"  scores              {s['scored_responses']:,} of {s['responses']:,} responses scored; correct = score "
        f">= {s['threshold']:g}",
        f"      {_summary_line(s)}",
        "      outcomes: " + "  ".join(f"{k} {v:,}" for k, v in s["statuses"].items()),
        f"  solve rate          {s['scored_prompts']:,} prompts scored ({s['unscored_prompts']:,} without a scored "
        f"response): never solved {s['never_solved']:,}, always solved {s['always_solved']:,}",
        "      correct/n: " + "  ".join(f"{k} x {v:,}" for k, v in s["solve_rate"].items()),
    ]
    if s.get("by"):
        lines.append(f"  by {s['by']}")
        width = max((len(k) for k in s["groups"]), default=0)
        for key, g in s["groups"].items():
            lines.append(f"      {key:<{width}}  {g['prompts']:>8,} prompts  {_summary_line(g)}")
    return lines


def flat_solve_rate_mask(
    batch: pa.RecordBatch, bounds: tuple[float, float], threshold: float = CORRECT_AT
) -> np.ndarray:
    """Flattened rows whose prompt (a run of one uid, whole in this batch) has its solve rate within bounds."""
    uid = batch.column("uid")
    starts = np.ones(batch.num_rows, bool)
    if batch.num_rows > 1:
        starts[1:] = pc.not_equal(uid[1:], uid[:-1]).fill_null(True).to_numpy(zero_copy_only=False)
    group = np.cumsum(starts) - 1
    ngroups = int(group[-1]) + 1 if batch.num_rows else 0
    offsets = pa.array(np.append(np.flatnonzero(starts), batch.num_rows).astype(np.int32))
    per_prompt = pa.ListArray.from_arrays(offsets, batch.column("score").cast(pa.float64()))
    keep = row_solve_rate_mask(per_prompt, bounds, threshold) if ngroups else np.zeros(0, bool)
    return keep[group]
