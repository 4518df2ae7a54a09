"""The engine interface: prompts in, each prompt's n completions out as soon as they finish.

Measured on an H100 with vLLM 0.26, a worker that generated chunk by chunk with a barrier between chunks
ran at 48% of one-shot throughput, while pulling finished requests out of the engine as they complete cost
nothing. So an engine takes the whole backlog at once (an iterable) and yields results in completion order;
the worker checkpoints from that stream without ever draining the engine.

The backlog may also yield ``NOTHING_NOW``: no request for now, more may come. An engine that reads ahead stops
reading until its next step, and goes on generating what it holds; one that does not read ahead skips it. The
worker yields it only while some of the engine's requests are unfinished, so it never makes an idle engine spin.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig
    from hpcrollout.images import ImageInput

# vLLM derives sample i's seed as request_seed + i (v1 parallel sampling); leave room for n below 2**31.
_SEED_SPACE = 2**31 - 2**20


def prompt_seed(run_seed: int, uid: str) -> int:
    """The base seed of one prompt; sample i uses ``prompt_seed + i``. Stable across runs and resumes."""
    digest = hashlib.blake2b(f"{run_seed}\0{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_SPACE


class _NothingNow:
    """The backlog's "no request for now, ask again after a step" (see the module docstring)."""

    def __repr__(self) -> str:
        return "NOTHING_NOW"


NOTHING_NOW: Any = _NothingNow()


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to sample ``sampling.n`` completions for."""

    uid: str
    row: int  # global input row index; results are merged back in this order
    # chat form: [{"role": ..., "content": ...}, ...]; content a string, or text and {"type": "image"} parts
    messages: list[dict[str, Any]] | None
    text: str | None  # raw prompt, used as is (no chat template); exactly one of messages/text is set
    seed: int  # base seed: sample i uses seed + i
    max_tokens: int | None = None  # this prompt's budget (data.max_tokens_column); None: sampling.max_tokens
    # this row's structured-output constraint (hpcrollout/structured.py); None: sampling.structured_outputs
    structured_outputs: dict[str, Any] | None = None
    lora: str | None = None  # this prompt's LoRA adapter directory (hpcrollout/lora.py); None: model.lora, if set
    images: tuple[ImageInput, ...] = ()  # the images of the {"type": "image"} parts, in order (hpcrollout/images.py)


@dataclass
class Sample:
    """One completion."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length" | "abort"
    seed: int
    stop_reason: str | None = None  # the stop string or token id (as text) that ended it, if any
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None  # logprob of each chosen token
    cumulative_logprob: float | None = None
    schema_valid: bool | None = None  # the response satisfies its prompt's structured-output constraint


@dataclass
class PromptResult:
    """All n completions of one prompt, or the reason there are none."""

    uid: str
    row: int
    samples: list[Sample] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None  # set: the row failed (prompt too long, bad messages...) and samples is empty
    lora: str | None = None  # the LoRA adapter the samples were drawn with (None: the base model)

    @classmethod
    def failed(cls, request: PromptRequest, reason: str) -> PromptResult:
        return cls(uid=request.uid, row=request.row, error=reason, lora=request.lora)


class Engine(abc.ABC):
    """A generation backend. One instance per worker process, reused across shards/units."""

    name: str = "base"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        # Called by generate() after every engine step, between results too: the worker commits and writes
        # heartbeats on time from it even while no prompt finishes. Must be cheap; must not re-enter generate().
        self.on_step: Callable[[], None] | None = None

    def stepped(self) -> None:
        """Let the worker act on time (see ``on_step``)."""
        if self.on_step is not None:
            self.on_step()

    @abc.abstractmethod
    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        """Yield one PromptResult per request, in completion order, as soon as all its samples finished.

        A request the engine rejects (too long, bad template) yields a result with ``error`` set; it never
        aborts the others. Stopping iteration early (generator closed) aborts what is still in flight.
        """

    def close(self) -> None:
        """Free the model and its memory."""

    def tokens_generated(self) -> int | None:
        """Tokens this engine has generated since it started, samples still decoding included; None if the backend
        cannot tell (the worker then counts the tokens of finished prompts). What live throughput is made of: a
        prompt's tokens are generated long before the prompt finishes."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts worth logging and recording in the run directory (versions, parallelism, devices)."""
        return {"backend": self.name}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
