"""Prompt cells: validation, normalisation and stable uids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


class BadPrompt(ValueError):
    """One row's prompt cannot be used; becomes an error record for that row."""


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, bytes):
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadPrompt(f"{where}: content is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(content, (list, tuple)):
        # OpenAI-style content parts: text parts are joined; anything else (images, audio) is not supported.
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadPrompt(f"{where}: content part {j} is of type {kind!r}; only text parts are supported")
        return "".join(texts)
    if content is None:
        raise BadPrompt(f"{where}: content is null")
    raise BadPrompt(f"{where}: content must be a string, got {type(content).__name__}")


def normalize_prompt(cell: Any, max_chars: int | None = None) -> tuple[list[dict[str, str]] | None, str | None]:
    """Return (messages, None) for a chat prompt or (None, text) for a raw string prompt.

    Raises BadPrompt with a reason naming the message index. Accepts a JSON string holding a message list
    (what CSV round trips produce).
    """
    if cell is None:
        raise BadPrompt("prompt is null")
    if isinstance(cell, bytes):
        try:
            cell = cell.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadPrompt(f"prompt is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(cell, str):
        stripped = cell.lstrip()
        if stripped.startswith("[{"):
            try:
                parsed = json.loads(cell)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return normalize_prompt(parsed, max_chars)
        if not cell.strip():
            raise BadPrompt("prompt is an empty string")
        if max_chars is not None and len(cell) > max_chars:
            raise BadPrompt(f"prompt has {len(cell):,} characters, more than data.max_prompt_chars={max_chars:,}")
        return None, cell
    if hasattr(cell, "tolist"):  # numpy arrays from pandas
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)):
        raise BadPrompt(f"prompt must be a list of {{role, content}} messages or a string, got {type(cell).__name__}")
    if not cell:
        raise BadPrompt("prompt is an empty message list")
    messages: list[dict[str, str]] = []
    total = 0
    for i, msg in enumerate(cell):
        where = f"message {i}"
        msg = _as_mapping(msg)
        if not isinstance(msg, dict):
            raise BadPrompt(f"{where} is a {type(msg).__name__}, not a {{role, content}} mapping")
        role = msg.get("role")
        if not isinstance(role, str):
            raise BadPrompt(f"{where} has no role" if role is None else f"{where}: role must be a string")
        if role not in ROLES:
            raise BadPrompt(f"{where} has unknown role {role!r} (expected one of {', '.join(sorted(ROLES))})")
        if "content" not in msg:
            raise BadPrompt(f"{where} has no content")
        text = _content_text(msg["content"], where)
        total += len(text)
        messages.append({"role": role, "content": text})
    if all(not m["content"].strip() for m in messages):
        raise BadPrompt("every message of the prompt is empty")
    if max_chars is not None and total > max_chars:
        raise BadPrompt(f"prompt has {total:,} characters, more than data.max_prompt_chars={max_chars:,}")
    return messages, None


def _as_mapping(msg: Any) -> Any:
    """A message stored as a Parquet map reads as [(key, value), ...]: the mapping it is. Anything else as is."""
    if hasattr(msg, "tolist"):
        msg = msg.tolist()
    if (
        isinstance(msg, (list, tuple))
        and msg
        and all(isinstance(kv, (list, tuple)) and len(kv) == 2 and isinstance(kv[0], str) for kv in msg)
    ):
        return dict(msg)
    return msg


def _canonical(cell: Any) -> bytes:
    if hasattr(cell, "tolist"):
        cell = cell.tolist()
    try:
        return json.dumps(cell, sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return repr(cell).encode("utf-8", "backslashreplace")


def derive_uid(row: int, cell: Any) -> str:
    """A stable id from the row's position and prompt content (same input file -> same uids)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(str(row).encode())
    h.update(b"\0")
    h.update(_canonical(cell))
    return h.hexdigest()


def prompt_chars(cell: Any) -> int:
    """Cheap size estimate of a prompt cell (characters), for work balancing. Never raises."""
    if cell is None:
        return 0
    if isinstance(cell, (str, bytes)):
        return len(cell)
    if hasattr(cell, "tolist"):
        cell = cell.tolist()
    if isinstance(cell, (list, tuple)):
        total = 0
        for msg in cell:
            msg = _as_mapping(msg)
            if isinstance(msg, dict):
                c = msg.get("content")
                total += prompt_chars(c) if not isinstance(c, dict) else 0
            elif isinstance(msg, str):
                total += len(msg)
        return total
    return 0
