"""Prompt cells: validation, normalisation and stable uids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


class BadPrompt(ValueError):
    """One row's prompt cannot be used; becomes an error record for that row."""


def _content_text(content: Any, where: str, images: bool = False) -> str | list[dict[str, Any]]:
    """A message's content: its text, or (``images``, with image parts) its parts: text and image parts in order,
    each image part ``{"type": "image", "source": URL-or-None}`` (hpcrollout/images.py)."""
    if isinstance(content, str):
        return content
    if isinstance(content, bytes):
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadPrompt(f"{where}: content is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(content, (list, tuple)):
        # OpenAI-style content parts: text parts are joined; anything else (images, audio) is not supported.
        from hpcrollout.images import image_part_source, is_image_part

        texts: list[str] = []
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            part = _as_mapping(part)
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif images and is_image_part(part):
                try:
                    source = image_part_source({k: v for k, v in part.items() if v is not None})
                except ValueError as exc:
                    raise BadPrompt(f"{where}: content part {j}: {exc}") from None
                if texts:
                    parts.append({"type": "text", "text": "".join(texts)})
                    texts = []
                parts.append({"type": "image", "source": source})
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                allowed = "text and image parts (image_url, image)" if images else "only text parts"
                raise BadPrompt(f"{where}: content part {j} is of type {kind!r}; {allowed} are supported")
        if not parts:
            return "".join(texts)
        if texts:
            parts.append({"type": "text", "text": "".join(texts)})
        return parts
    if content is None:
        raise BadPrompt(f"{where}: content is null")
    raise BadPrompt(f"{where}: content must be a string, got {type(content).__name__}")


def normalize_prompt(
    cell: Any, max_chars: int | None = None, images: bool = False
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Return (messages, None) for a chat prompt or (None, text) for a raw string prompt.

    Raises BadPrompt with a reason naming the message index. Accepts a JSON string holding a message list
    (what CSV round trips produce). With ``images``, a message with image parts keeps its content as parts
    (see _content_text); otherwise image parts are refused.
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
                return normalize_prompt(parsed, max_chars, images)
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
    messages: list[dict[str, Any]] = []
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
        content = _content_text(msg["content"], where, images)
        total += len(content) if isinstance(content, str) else sum(len(p.get("text", "")) for p in content)
        messages.append({"role": role, "content": content})
    if all(isinstance(m["content"], str) and not m["content"].strip() for m in messages):
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


def derive_uid(row: int, cell: Any, images: bytes = b"") -> str:
    """A stable id from the row's position and prompt content (same input file -> same uids); ``images``: a hash
    of the row's data.image_column images (hpcrollout/images.py), which are part of its content."""
    h = hashlib.blake2b(digest_size=10)
    h.update(str(row).encode())
    h.update(b"\0")
    h.update(_canonical(cell))
    if images:
        h.update(b"\0")
        h.update(images)
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
                if hasattr(c, "tolist"):
                    c = c.tolist()
                if isinstance(c, (list, tuple)):  # content parts: their text (images are counted by images.py)
                    total += sum(len(p.get("text") or "") for p in map(_as_mapping, c) if isinstance(p, dict))
                else:
                    total += prompt_chars(c) if not isinstance(c, dict) else 0
            elif isinstance(msg, str):
                total += len(msg)
        return total
    return 0
