"""Which prompts to hand to vLLM next, and when: within what its KV cache can hold (optionally longest first).

vLLM admits a waiting request as soon as its *prompt* fits in the KV cache; the sequences then grow, the cache
runs out, and vLLM preempts the newest ones and later recomputes them. With many long samples in flight
(n=8 x 2048 tokens is 16k tokens per prompt) that churn costs GPU time, and no prompt finishes until late.

- **Budget** (``engine.kv_budget``, default 1.0): the prompts in flight may together *reserve* at most that
  fraction of the KV cache, a prompt reserving what it will hold at its largest: its prompt tokens (shared by
  its n samples through prefix caching, else n copies) plus n expected outputs (plus a partly filled block
  each). With ``ignore_eos`` the expected output is exactly the prompt's ``max_tokens``; otherwise it is
  ``max_tokens`` times the mean fraction of their budget that finished samples used, learned as prompts
  finish (until ``4 n`` samples have finished, no budget applies and at most ``warmup_seqs`` sequences are kept
  in flight, about what vLLM can run at once, so the estimate takes over quickly). A prompt larger than half
  the budget is let in once half of it is free; an empty engine always takes the next prompt. ``None``: no
  budget, everything read ahead is submitted at once (vLLM's own scheduling, as ``LLM.generate``).
- **Order** (``engine.longest_first``, default off): input order, or the read-ahead prompt reserving the most
  first. Longest-first shortens the tail of a small batch, but most prompts then finish near the end, so
  checkpoints hold little until late; on the H100 benchmarks it did not pay (hpcrollout/benchmarks/RESULTS.md).

The order only changes when a prompt runs, never what it produces: every prompt carries its own seed.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass(order=True)
class _Waiting:
    key: tuple[int, int]
    item: Any = field(compare=False)
    prompt_tokens: int = field(compare=False)
    max_tokens: int = field(compare=False)


class Admission:
    """A lookahead pool of tokenized prompts and the KV-cache budget of those in flight."""

    def __init__(
        self,
        *,
        capacity_tokens: int | None,
        fraction: float | None,
        n: int,
        ignore_eos: bool,
        block_size: int = 16,
        prefix_caching: bool = True,
        warmup_seqs: int = 2048,
        longest_first: bool = False,
    ) -> None:
        self.n = n
        self.ignore_eos = ignore_eos
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.budget = int(capacity_tokens * fraction) if capacity_tokens and fraction else None
        self.warmup = 4 * n  # finished samples before the learned estimate is trusted
        self.warmup_seqs = warmup_seqs
        self.longest_first = longest_first
        self._pool: list[_Waiting] = []
        self._order = itertools.count()
        self.reserved = 0
        self.inflight_seqs = 0
        self.peak_reserved = 0
        self.held_back = 0  # calls that found the next prompt waiting for room
        self._used_tokens = 0  # finished samples: tokens generated ...
        self._budget_tokens = 0  # ... out of the max_tokens they were given
        self._finished_samples = 0

    # estimates
    @property
    def fill_ratio(self) -> float | None:
        """Expected output / max_tokens: 1 with ignore_eos, learned otherwise (None while warming up)."""
        if self.ignore_eos:
            return 1.0
        if self._finished_samples < self.warmup or not self._budget_tokens:
            return None
        return min(1.0, max(self._used_tokens / self._budget_tokens, 1e-3))

    def cost(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV tokens a prompt of this size holds at its largest (with the current estimate of its outputs)."""
        ratio = self.fill_ratio
        expected = max_tokens if ratio is None else max(1, round(max_tokens * ratio))
        per_sample = expected + self.block_size  # each sample's last block is partly filled
        if self.prefix_caching:
            return prompt_tokens + self.n * per_sample
        return self.n * (prompt_tokens + per_sample)

    # the pool
    @property
    def waiting(self) -> int:
        """Prompts read ahead and not yet submitted."""
        return len(self._pool)

    def add(self, item: Any, prompt_tokens: int, max_tokens: int) -> None:
        key = (-self.cost(prompt_tokens, max_tokens) if self.longest_first else 0, next(self._order))
        heapq.heappush(self._pool, _Waiting(key, item, prompt_tokens, max_tokens))

    def _fits(self, cost: int) -> bool:
        if self.inflight_seqs == 0:
            return True
        if self.budget is None:
            return True
        if self.fill_ratio is None:  # warming up: keep about what vLLM can run at once
            return self.inflight_seqs + self.n <= self.warmup_seqs
        return self.reserved + min(cost, self.budget // 2) <= self.budget

    def take(self) -> tuple[Any, int] | None:
        """The next prompt to submit and what it reserves, or None while it must wait for room."""
        if not self._pool:
            return None
        head = self._pool[0]
        cost = self.cost(head.prompt_tokens, head.max_tokens)  # with the estimate as it is now
        if not self._fits(cost):
            self.held_back += 1
            return None
        heapq.heappop(self._pool)
        self.reserved += cost
        self.inflight_seqs += self.n
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return head.item, cost

    def done(self, cost: int, samples: list[tuple[int, int]] = ()) -> None:
        """A prompt left the engine: free its reservation; learn from its samples' (tokens, max_tokens)."""
        self.reserved -= cost
        self.inflight_seqs -= self.n
        for used, budget in samples:
            self._used_tokens += used
            self._budget_tokens += budget
            self._finished_samples += 1

    def describe(self) -> dict[str, Any]:
        ratio = self.fill_ratio
        return {
            "kv_budget_tokens": self.budget,
            "peak_reserved_tokens": self.peak_reserved,
            "expected_fill_ratio": None if ratio is None else round(ratio, 4),
            "held_back": self.held_back,
        }
