"""Prompts to token ids, one way for every backend: the chat template (the tokenizer's, or model.chat_template)
for chat prompts, the tokenizer's usual special tokens for raw strings, as vLLM's chat and generate paths do.

Setup errors a user can fix (a missing template file, a tokenizer without a chat template for chat input) are
one HpcRolloutError for the whole task, never one error record per row nor a retried crash; a template that
rejects one conversation fails that row only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcrollout.engines.base import PromptRequest
from hpcrollout.errors import HpcRolloutError

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig


class PromptRenderer:
    """Chat template + tokenizer: requests -> prompt token ids, in batches, as vLLM's chat/generate would."""

    def __init__(self, config: RunConfig, tokenizer: Any = None) -> None:
        mc = config.model
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    mc.tokenizer or mc.path, trust_remote_code=mc.trust_remote_code
                )
            except (OSError, ValueError) as exc:  # ValueError: the hub's "Repo id must be in the form ..."
                raise HpcRolloutError(
                    f"model.tokenizer/model.path: cannot load a tokenizer from {mc.tokenizer or mc.path!r}: {exc}"
                ) from None
        self.tokenizer = tokenizer
        self.template: str | None = None
        if mc.chat_template:
            path = Path(mc.chat_template)
            if not path.is_file():
                raise HpcRolloutError(f"model.chat_template: {path} does not exist (give a Jinja template file)")
            self.template = path.read_text()
        self.template_kwargs = dict(mc.chat_template_kwargs)
        self.tokenize_s = 0.0
        self.prompts = 0

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise HpcRolloutError(
                "the model's tokenizer has no chat template, but the input holds chat messages; "
                "set model.chat_template to a Jinja template file (or give raw string prompts)"
            )
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )

    def encode(self, requests: list[PromptRequest]) -> list[list[int] | str]:
        """Token ids per request, or the reason the request cannot be rendered (an error record)."""
        started = time.perf_counter()
        out: list[list[int] | str] = [""] * len(requests)
        chat: list[tuple[int, str]] = []
        raw: list[tuple[int, str]] = []
        for i, req in enumerate(requests):
            if req.messages is None:
                raw.append((i, req.text or ""))
                continue
            try:
                chat.append((i, self.render(req.messages)))
            except HpcRolloutError:
                raise
            except Exception as exc:  # a template that rejects this conversation fails the row, not the shard
                out[i] = f"chat template failed: {type(exc).__name__}: {exc}"
        # Rendered chat text already holds its special tokens (as in vLLM's chat path); raw text gets the
        # tokenizer's usual BOS handling (as in LLM.generate). One batched call each: fast tokenizers use threads.
        for group, special in ((chat, False), (raw, True)):
            if group:
                ids = self.tokenizer([text for _, text in group], add_special_tokens=special)["input_ids"]
                for (i, _), row_ids in zip(group, ids, strict=True):
                    out[i] = list(row_ids)
        self.tokenize_s += time.perf_counter() - started
        self.prompts += len(requests)
        return out
