"""Which prompts to hand to vLLM next, and when: by the projected KV-cache peak of everything in flight.

vLLM admits a waiting request as soon as its *prompt* fits in the KV cache; the sequences then grow, the cache
runs out, and vLLM preempts the newest ones and later recomputes them. With many long samples in flight
(n=8 x 2048 tokens is 16k tokens per prompt) that churn costs GPU time, and no prompt finishes until late.

**Projected peak** (``engine.kv_budget``, default 1.0 = the whole cache). A prompt is handed over only if the
KV cache that everything in flight will hold, projected forward step by step, stays within the budget at
every future step with the newcomer added. The projection follows what vLLM 0.26 allocates
(v1/core/kv_cache_manager.py, blocks of ``block_size`` tokens):

- each running sample holds the blocks of its own tokens (with prefix caching, the prompt's *full* blocks are
  shared by the n samples of a prompt and its partial last block is each sample's own; without it, each
  sample holds the whole prompt), grows one token a step, and frees its blocks when it finishes; the shared
  prompt blocks are freed with the prompt's last sample;
- a sample's final length is known with ``ignore_eos`` and a per-prompt or run ``max_tokens`` (its remaining
  budget), and the projection is exact (up to the blocks' rounding, which it counts high); otherwise the
  lengths of samples that finished already are the distribution: a sample that has generated g tokens is
  alive k steps later with the probability that a finished sample was longer than g + k, given longer than
  g, and the projected usage is the expectation over all samples (until ``4 n`` samples have finished, each
  is projected to run to its ``max_tokens``);
- how far each sample has got is read from the engine's outputs as they stream (``advance``) or, where the
  engine does not say, counted in steps (``tick``).

With known lengths the usage is piecewise linear between finishes, so its peak over the future is one of the
moments just before a sample finishes: the check is a max over those, vectorized; with learned lengths it is
a max over a grid of future steps. Staggered prompts then share the cache
instead of each reserving its largest size from the start (the rule before: a prompt reserved
``prompt + n x max_tokens`` for its whole life), so the batch stays large and prompts finish steadily, which
is what the checkpoint interval needs. When lengths turn out longer than projected, vLLM's own preemption is
the safety net; the backend counts how often it fires.

**Pacing** (``engine.pacing``). The peak rule alone is greedy: with equal known lengths (ignore_eos, one
max_tokens) it admits a full wave at step 0, and nothing more fits until that whole wave finishes together,
so the work runs in waves whose caches are half empty on average and the last wave runs nearly alone (the
seed's 100 x 8 x 2048 workload on an H200 cache: 3 waves, 6,144 steps). Pacing adds a bucket of KV
token-steps: a prompt also needs its life's area (each sample's tokens summed over its steps) in the bucket,
which holds ``pacing`` x budget x the prompt's expected length and refills by 1.5 budgets a step. Prompts
then start staggered and the cache stays full (the same workload: 4,428 steps; any schedule needs at least
3,271, `benchmarks/admission_bound.py`). With a long-tailed mix the greedy rule staggers by itself and the
bucket only holds prompts back (4-12% more steps in the same model), so ``auto`` paces only equal known
lengths. When the input is all read and every waiting prompt fits beside what runs, the bucket is skipped:
there is no later wave to make room for (a workload of one wave is never slowed).

Other rules: an empty engine always takes the next prompt (one larger than the budget still runs); at most
``max_seqs`` samples are in flight (vLLM's ``max_num_seqs``: more would only wait inside vLLM, where the
projection would count them as growing). ``kv_budget: None`` turns it all off: everything read ahead is
submitted at once (vLLM's own scheduling, as ``LLM.generate``).

**Order** (``engine.longest_first``, default off): input order, or the read-ahead prompt with the most
expected tokens first. The order only changes when a prompt runs, never what it produces: every prompt
carries its own seed.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LENGTHS_KEPT = 4096  # finished samples' budget fractions kept for the length projection (most recent)
# Progress alone rebuilds the projection at most this often (a rebuild over ~1000 samples takes milliseconds
# of the engine's client process; a few steps of growth in between are ~1% of the cache); a prompt that
# leaves the engine rebuilds it at once, since that is when room appears.
_REBUILD_S = 0.1
# Pacing refills its bucket by this many budgets of token-steps a step: a little faster than the cache can hold
# in the long run, so the bucket staggers equal-length samples without starving a long-tailed mix.
_PACE_RATE = 1.5


@dataclass(order=True)
class _Waiting:
    key: tuple[int, int]
    item: Any = field(compare=False)
    prompt_tokens: int = field(compare=False)
    max_tokens: int = field(compare=False)


@dataclass
class _Flight:
    """A prompt handed to the engine: its size and how far each of its samples has got."""

    prompt_tokens: int
    max_tokens: int
    generated: list[int]
    finished: list[bool]

    @property
    def running(self) -> int:
        return self.finished.count(False)


class Admission:
    """A lookahead pool of tokenized prompts, and the projected KV-cache usage of those in flight."""

    def __init__(
        self,
        *,
        capacity_tokens: int | None,
        fraction: float | None,
        n: int,
        ignore_eos: bool,
        block_size: int = 16,
        prefix_caching: bool = True,
        max_seqs: int | None = None,
        longest_first: bool = False,
        pacing: float | None = None,
        pacing_auto: bool = False,
    ) -> None:
        self.n = n
        self.ignore_eos = ignore_eos
        self.block_size = max(1, int(block_size))
        self.prefix_caching = prefix_caching
        self.budget = int(capacity_tokens * fraction) if capacity_tokens and fraction else None
        self.max_seqs = max_seqs
        self.warmup = 4 * n  # finished samples before their lengths are trusted for the projection
        self.longest_first = longest_first
        self._pool: list[_Waiting] = []
        self._order = itertools.count()
        self._keys = itertools.count()
        self.flights: dict[int, _Flight] = {}
        self.inflight_seqs = 0  # samples handed over and not finished
        self.peak_projected = 0  # the largest projected peak an admission was allowed at
        self.held_back = 0  # checks that found the next prompt waiting for room
        self.admitted = 0
        self._fractions: list[float] = []  # finished samples: tokens used / max_tokens, most recent last
        self._sorted: np.ndarray | None = None  # ... sorted, with suffix sums, for conditional means
        self._suffix: np.ndarray | None = None
        self._round: _Projection | _ExpectedProjection | None = None
        self._longest_budget = 1  # the largest max_tokens seen: how far ahead a projection looks
        self._stale = False  # progress since the projection was built (it is rebuilt at most every _REBUILD_S)
        self._built = 0.0
        self.rebuild_s = _REBUILD_S
        # Pacing (see the module docstring): a bucket of KV token-steps, refilled by the budget every step.
        self.pacing = pacing if pacing and self.budget is not None else None
        self.pacing_auto = pacing_auto  # pace only while every sample's length is known and the same
        self._budgets: set[int] = set()  # max_tokens values seen (up to two: equal or not)
        self._credit = float("inf")  # full until the first admission caps it
        self.input_done = False  # the engine has read its whole input: the pool is all that is left
        self.steps = 0  # engine steps seen (stepped())
        self.paced = 0  # checks that found the next prompt waiting for the bucket

    # ------------------------------------------------------------------------------------------- lengths
    @property
    def learned(self) -> bool:
        return self.ignore_eos or len(self._fractions) >= self.warmup

    @property
    def fill_ratio(self) -> float | None:
        """Mean output / max_tokens of finished samples: 1 with ignore_eos, None while warming up."""
        if self.ignore_eos:
            return 1.0
        if not self.learned:
            return None
        return min(1.0, max(float(np.mean(self._fractions)), 1e-3))

    def expected_length(self, generated: int, max_tokens: int) -> int:
        """The projected final length of a sample that has generated ``generated`` of its ``max_tokens``."""
        if self.ignore_eos or not self.learned:
            return max_tokens
        if self._sorted is None:
            self._sorted = np.sort(np.asarray(self._fractions, dtype=np.float64))
            self._suffix = np.concatenate([np.cumsum(self._sorted[::-1])[::-1], [0.0]])
        frac = generated / max_tokens if max_tokens else 1.0
        i = int(np.searchsorted(self._sorted, frac, side="right"))
        if i >= len(self._sorted):  # longer than every finished sample so far: its budget bounds it
            return max_tokens
        mean = self._suffix[i] / (len(self._sorted) - i)
        return int(min(max_tokens, max(generated + 1, round(mean * max_tokens))))

    def _learn(self, used: int, budget: int) -> None:
        if budget <= 0:
            return
        self._fractions.append(min(1.0, used / budget))
        if len(self._fractions) > _LENGTHS_KEPT:
            del self._fractions[: len(self._fractions) - _LENGTHS_KEPT]
        self._sorted = self._suffix = None

    # ------------------------------------------------------------------------------------------- sizes
    def _blocks(self, tokens: int | np.ndarray) -> Any:
        return -(-tokens // self.block_size) * self.block_size

    def _shared(self, prompt_tokens: int) -> int:
        """Prompt tokens in blocks shared by the n samples (full blocks, with prefix caching)."""
        return (prompt_tokens // self.block_size) * self.block_size if self.prefix_caching else 0

    def _own(self, prompt_tokens: int) -> int:
        """Prompt tokens each sample holds in blocks of its own."""
        return prompt_tokens - self._shared(prompt_tokens)

    def _area(self, prompt_tokens: int, length: int) -> float:
        """KV token-steps a prompt holds over its life: each sample's tokens summed over its steps."""
        own = self._own(prompt_tokens)
        return self.n * (own * length + length * (length + 1) / 2) + self._shared(prompt_tokens) * length

    def _pacing_on(self) -> bool:
        """engine.pacing applies: always when set, with 'auto' while lengths are known and all equal."""
        return not self.pacing_auto or (self.ignore_eos and len(self._budgets) == 1)

    def _tail_fits(self) -> bool:
        """The input is all read and every waiting prompt fits at its largest beside the current projection: no
        later wave to make room for, so pacing would only delay the end."""
        if not self.input_done or self._round is None:
            return False
        room = self.budget - max(int(self._round.usage.max()) if len(self._round.usage) else 0, self.reserved)
        return sum(self.cost(w.prompt_tokens, w.max_tokens) for w in self._pool) <= room

    def cost(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV tokens a prompt of this size holds at its largest (all n samples at their projected length)."""
        length = self.expected_length(0, max_tokens)
        return self._shared(prompt_tokens) + self.n * int(self._blocks(self._own(prompt_tokens) + length))

    # ------------------------------------------------------------------------------------------- the pool
    @property
    def waiting(self) -> int:
        """Prompts read ahead and not yet submitted."""
        return len(self._pool)

    @property
    def reserved(self) -> int:
        """KV tokens the prompts in flight hold now (as projected from their progress)."""
        return sum(self._holds(f) for f in self.flights.values())

    def _holds(self, f: _Flight) -> int:
        own = self._own(f.prompt_tokens)
        held = sum(int(self._blocks(own + g)) for g, done in zip(f.generated, f.finished) if not done)
        return held + (self._shared(f.prompt_tokens) if f.running else 0)

    def add(self, item: Any, prompt_tokens: int, max_tokens: int) -> None:
        size = prompt_tokens + self.n * self.expected_length(0, max_tokens)
        key = (-size if self.longest_first else 0, next(self._order))
        self._longest_budget = max(self._longest_budget, max_tokens)
        if len(self._budgets) < 2:
            self._budgets.add(max_tokens)
        heapq.heappush(self._pool, _Waiting(key, item, prompt_tokens, max(1, max_tokens)))

    def take(self) -> tuple[Any, int] | None:
        """The next prompt to submit and its flight key, or None while it must wait for room."""
        if not self._pool:
            return None
        head = self._pool[0]
        if self.inflight_seqs and self.budget is not None:
            if self.max_seqs is not None and self.inflight_seqs + self.n > self.max_seqs:
                self.held_back += 1
                return None
            now = time.monotonic()
            if self._round is None or (self._stale and now - self._built >= self.rebuild_s):
                self._round = _ExpectedProjection(self) if self.learned and not self.ignore_eos else _Projection(self)
                self._built, self._stale = now, False
            peak = self._round.peak_with(head.prompt_tokens, head.max_tokens)
            if peak > self.budget:
                self.held_back += 1
                return None
            if self.pacing is not None and self._pacing_on() and not self._tail_fits():
                length = self.expected_length(0, head.max_tokens)
                area = self._area(head.prompt_tokens, length)
                # the bucket holds at least the head's own area, or a prompt could only start in an empty engine
                self._credit = min(self._credit, max(area, self.pacing * self.budget * length))
                if area > self._credit:
                    self.paced += 1
                    return None
                self._credit -= area
            self.peak_projected = max(self.peak_projected, peak)
        elif self.budget is not None:
            self.peak_projected = max(self.peak_projected, self.cost(head.prompt_tokens, head.max_tokens))
        heapq.heappop(self._pool)
        key = next(self._keys)
        self.flights[key] = _Flight(head.prompt_tokens, head.max_tokens, [0] * self.n, [False] * self.n)
        self.inflight_seqs += self.n
        self.admitted += 1
        if self._round is not None:
            self._round.admitted(head.prompt_tokens, head.max_tokens)
        return head.item, key

    # ------------------------------------------------------------------------------------------- progress
    def advance(self, key: int, sample: int, tokens: int, finished: bool) -> None:
        """Sample ``sample`` of flight ``key`` generated ``tokens`` more; ``finished``: it is done."""
        f = self.flights.get(key)
        if f is None or not 0 <= sample < self.n or f.finished[sample]:
            return
        f.generated[sample] += tokens
        if finished:
            f.finished[sample] = True
            self.inflight_seqs -= 1
            self._learn(f.generated[sample], f.max_tokens)
        self._stale = True

    def stepped(self) -> None:
        """One engine step passed: the pacing bucket refills by the budget (token-steps the cache can hold)."""
        self.steps += 1
        if self.pacing is not None and self.budget is not None:
            self._credit += _PACE_RATE * self.budget

    def tick(self) -> None:
        """One engine step passed, for an engine that does not report progress: every running sample grew a token."""
        for f in self.flights.values():
            for i, done in enumerate(f.finished):
                if not done:
                    f.generated[i] = min(f.generated[i] + 1, f.max_tokens - 1)
        self._stale = True

    def done(self, key: int, samples: list[tuple[int, int]] = ()) -> None:
        """Flight ``key`` left the engine (all samples done, or rejected): free it; learn unseen samples' lengths."""
        f = self.flights.pop(key, None)
        if f is None:
            return
        seen = [i for i, done in enumerate(f.finished) if done]
        self.inflight_seqs -= f.running
        for i, (used, budget) in enumerate(samples):
            if i not in seen:  # progress did not report it: learn its length now
                self._learn(used, budget)
        self._round = None

    def describe(self) -> dict[str, Any]:
        ratio = self.fill_ratio
        return {
            "rule": "projected peak",
            "kv_budget_tokens": self.budget,
            "peak_projected_tokens": self.peak_projected,
            "expected_fill_ratio": None if ratio is None else round(ratio, 4),
            "admitted": self.admitted,
            "held_back": self.held_back,
            "pacing": self.pacing if self._pacing_on() else None,
            "paced": self.paced,
            "steps": self.steps,
        }


class _Projection:
    """Projected KV usage U(k) of the flights, k steps ahead, at the moments it can peak.

    Built once per change of progress; admissions between changes are added to it in place. U(k) counts a
    sample with r steps left as alive for k <= r (at its full length just before it finishes) and a prompt's
    shared blocks while any of its samples is alive, so max U over the future is the max over k in the set
    of remaining-step counts.
    """

    def __init__(self, adm: Admission) -> None:
        self.adm = adm
        rem, base, p_rem, p_shared = [], [], [], []
        for f in adm.flights.values():
            own = adm._own(f.prompt_tokens)
            longest = 0
            for g, done in zip(f.generated, f.finished):
                if done:
                    continue
                r = max(1, adm.expected_length(g, f.max_tokens) - g)
                rem.append(r)
                base.append(own + g + adm.block_size - 1)  # + k at step k; the last block partly filled
                longest = max(longest, r)
            if longest:
                p_rem.append(longest)
                p_shared.append(adm._shared(f.prompt_tokens))
        self.rem = np.asarray(rem, dtype=np.int64)
        order = np.argsort(self.rem, kind="stable")
        self.rem = self.rem[order]
        self.base_suffix = _suffix_sums(np.asarray(base, dtype=np.int64)[order])
        self.p_rem = np.asarray(p_rem, dtype=np.int64)
        porder = np.argsort(self.p_rem, kind="stable")
        self.p_rem = self.p_rem[porder]
        self.shared_suffix = _suffix_sums(np.asarray(p_shared, dtype=np.int64)[porder])
        self.grid = np.unique(self.rem)
        self.usage = self._existing(self.grid)
        self.new: list[tuple[int, int, int]] = []  # admitted since: (steps left, base per sample, shared)

    def _existing(self, k: np.ndarray) -> np.ndarray:
        """U(k) of the flights the projection was built from."""
        i = np.searchsorted(self.rem, k, side="left")  # samples with rem >= k are alive at k
        alive = len(self.rem) - i
        j = np.searchsorted(self.p_rem, k, side="left")
        return self.base_suffix[i] + alive * k + self.shared_suffix[j]

    def _newcomer(self, prompt_tokens: int, max_tokens: int) -> tuple[int, int, int]:
        adm = self.adm
        length = adm.expected_length(0, max_tokens)
        return length, adm._own(prompt_tokens) + adm.block_size - 1, adm._shared(prompt_tokens)

    def _usage_at(self, k: int) -> int:
        total = int(self._existing(np.asarray([k]))[0])
        n = self.adm.n
        return total + sum(n * (b + k) + s for r, b, s in self.new if k <= r)

    def peak_with(self, prompt_tokens: int, max_tokens: int) -> int:
        """max over the future of U(k) with this prompt added."""
        r, base, shared = self._newcomer(prompt_tokens, max_tokens)
        n = self.adm.n
        own_peak = self._usage_at(r) + n * (base + r) + shared
        upto = int(np.searchsorted(self.grid, r, side="right"))
        if not upto:
            return own_peak
        k = self.grid[:upto]
        return max(own_peak, int((self.usage[:upto] + n * (base + k) + shared).max()))

    def admitted(self, prompt_tokens: int, max_tokens: int) -> None:
        r, base, shared = self._newcomer(prompt_tokens, max_tokens)
        n = self.adm.n
        self.usage = self.usage + np.where(self.grid <= r, n * (base + self.grid) + shared, 0)
        self.new.append((r, base, shared))
        i = int(np.searchsorted(self.grid, r))
        if i == len(self.grid) or self.grid[i] != r:
            self.grid = np.insert(self.grid, i, r)
            self.usage = np.insert(self.usage, i, self._usage_at(r))


class _ExpectedProjection:
    """Expected KV usage k steps ahead when lengths are learned, not known, on a grid of k.

    A sample with g of m tokens generated holds ``own + g + k`` tokens k steps ahead if it is still running,
    which it is with probability S(k) = P(F m > g + k) / P(F m > g), F the finished samples' fractions of
    their budget; a prompt's shared blocks stay while any of its samples may run (the largest S).
    """

    _POINTS = 48

    def __init__(self, adm: Admission) -> None:
        self.adm = adm
        self.fractions = np.sort(np.asarray(adm._fractions, dtype=np.float64))
        flights = [f for f in adm.flights.values() if f.running]
        horizon = max([adm._longest_budget] + [f.max_tokens for f in flights])
        self.grid = np.unique(np.linspace(0, horizon, self._POINTS).astype(np.int64))
        self.usage = np.zeros(len(self.grid), dtype=np.float64)
        own, gen, budget, prompt = [], [], [], []
        for i, f in enumerate(flights):
            for g, done in zip(f.generated, f.finished):
                if not done:
                    own.append(adm._own(f.prompt_tokens))
                    gen.append(g)
                    budget.append(f.max_tokens)
                    prompt.append(i)
        if own:
            gen_a, budget_a = np.asarray(gen, dtype=np.float64), np.asarray(budget, dtype=np.float64)
            alive = self._survival(gen_a, budget_a)  # samples x grid
            # the last block is half full on average (an expectation, like the rest of this projection)
            held = (np.asarray(own, dtype=np.float64)[:, None] + gen_a[:, None] + self.grid[None, :]) + (
                adm.block_size / 2
            )
            self.usage += (held * alive).sum(axis=0)
            shared = np.asarray([adm._shared(f.prompt_tokens) for f in flights], dtype=np.float64)
            any_alive = np.zeros((len(flights), len(self.grid)))
            np.maximum.at(any_alive, np.asarray(prompt), alive)
            self.usage += (shared[:, None] * any_alive).sum(axis=0)

    def _survival(self, generated: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """P(still running k steps ahead) per sample and grid point."""
        f = self.fractions
        total = len(f)
        now = total - np.searchsorted(f, generated / budget, side="right")
        later = total - np.searchsorted(f, (generated[:, None] + self.grid[None, :]) / budget[:, None], side="right")
        cap = (generated[:, None] + self.grid[None, :]) < budget[:, None]  # no sample outlives its budget
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(now[:, None] > 0, later / np.maximum(now[:, None], 1), 1.0)  # beyond all seen: to budget
        return np.where(cap, ratio, 0.0)

    def _curve(self, prompt_tokens: int, max_tokens: int) -> np.ndarray:
        adm = self.adm
        alive = self._survival(np.zeros(1), np.asarray([float(max_tokens)]))[0]
        per_sample = (adm._own(prompt_tokens) + self.grid + adm.block_size / 2) * alive
        any_alive = 1.0 - (1.0 - alive) ** adm.n
        return adm.n * per_sample + adm._shared(prompt_tokens) * any_alive

    def peak_with(self, prompt_tokens: int, max_tokens: int) -> int:
        return int(np.ceil((self.usage + self._curve(prompt_tokens, max_tokens)).max()))

    def admitted(self, prompt_tokens: int, max_tokens: int) -> None:
        self.usage = self.usage + self._curve(prompt_tokens, max_tokens)


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    """out[i] = values[i:].sum(), with out[len] = 0."""
    return np.concatenate([np.cumsum(values[::-1])[::-1], [0]]).astype(np.int64)
