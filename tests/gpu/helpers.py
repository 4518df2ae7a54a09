"""Request builders shared by the GPU tests."""

from __future__ import annotations

from hpcrollout.engines.base import PromptRequest, prompt_seed

TOPICS = ["primes", "tides", "bread", "stars", "rivers", "music", "chess", "clouds"]


def chat_request(row: int, run_seed: int = 1234, content: str | None = None) -> PromptRequest:
    uid = f"u{row:04d}"
    messages = [{"role": "user", "content": content or f"Tell me about {TOPICS[row % len(TOPICS)]}, part {row}."}]
    if row % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    return PromptRequest(uid=uid, row=row, messages=messages, text=None, seed=prompt_seed(run_seed, uid))


def text_request(row: int, text: str, run_seed: int = 1234) -> PromptRequest:
    uid = f"t{row:04d}"
    return PromptRequest(uid=uid, row=row, messages=None, text=text, seed=prompt_seed(run_seed, uid))


def by_row(results) -> dict:
    return {r.row: r for r in results}
