"""Image prompts: where a prompt's images come from, how they are read, hashed and counted.

A chat message's content may hold image parts beside text parts:
- ``{"type": "image_url", "image_url": {"url": URL}}`` (OpenAI's form; ``"image_url": URL`` too), URL one of
  ``data:image/...;base64,...``, ``file:///abs/path.png``, an absolute path, or a path relative to
  ``data.image_dir`` (default: the directory of ``data.input``; see ``image_base``). ``http(s)://`` is refused:
  compute nodes usually have no network, and a run must not depend on a server staying up.
- ``{"type": "image"}``: the next image of the row's ``data.image_column`` cell (binary, a ``{bytes, path}``
  struct as Hugging Face datasets store images, or a list of them), in order; the count must match.

Invariants:
- The worker reads each image's bytes (``load_images``); a missing or unreadable image makes its row an error
  record naming the row and the image (``BadImage``), never the shard. Decoding happens in the engine, where a
  file that is not an image fails its row the same way.
- What the chat template sees is ``{"type": "image"}`` at the image's place (the transformers processors'
  convention, which vLLM's chat templates follow too); the images go to the model as multi-modal data.
- The uid of a row without ``data.id_column`` hashes the prompt cell (image paths and data URLs as written) and
  the bytes of its ``data.image_column`` images (``column_digest``). Image files are hashed by path, not
  content: hashing their content would read every image on the submitting node before anything runs, and the
  uid, which holds the row position, only has to be stable for a given input. An image replaced on disk under
  the same path during a run is not detected.
- Sharding counts image tokens in a row's work: see ``ImageTokens``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

DEFAULT_IMAGE_TOKENS = 256  # per image, when the model's processor config gives no way to count them


class BadImage(ValueError):
    """One image of a row cannot be used; the row becomes an error record."""


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, as read by the worker: where it came from (for messages) and its bytes."""

    source: str  # the path, "data: URL", or "data.image_column COLUMN[i]"
    data: bytes

    @property
    def digest(self) -> str:
        """Content hash (vLLM's multi_modal_uuids: the engine need not hash the pixels again)."""
        return hashlib.blake2b(self.data, digest_size=16).hexdigest()


def image_part_source(part: dict[str, Any]) -> str | None:
    """The URL or path of an image part, or None for ``{"type": "image"}`` (the image column's next image).

    Raises ValueError for a part that is not a well-formed image part."""
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ValueError('image_url part without a url (expected {"type": "image_url", "image_url": {"url": ...}})')
        return url.strip()
    if kind == "image":
        for key in ("image", "url", "path"):  # transformers' chat form names the source one of these
            if isinstance(part.get(key), str) and part[key].strip():
                return part[key].strip()
        return None
    raise ValueError(f"content part of type {kind!r} is not an image part")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def image_base(config: RunConfig) -> Path:
    """The directory relative image paths resolve against: data.image_dir, else data.input's directory."""
    data = config.data
    if data.image_dir:
        return Path(data.image_dir)
    spec = str(data.input or ".")
    if any(c in spec for c in "*?["):
        fixed = list(itertools.takewhile(lambda p: not any(c in p for c in "*?["), Path(spec).parts))
        return Path(*fixed) if fixed else Path(".")
    path = Path(spec)
    return path if path.is_dir() else path.parent


def read_source(source: str, base: Path) -> bytes:
    """The bytes of an image given by URL or path; BadImage says why they cannot be read."""
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep:
            raise BadImage("data: URL without a comma before its data")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return unquote(payload).encode("latin-1")
        except (binascii.Error, ValueError) as exc:
            raise BadImage(f"data: URL is not valid base64 ({exc})") from None
    if source.startswith(("http://", "https://")):
        raise BadImage("http(s) image URLs are not fetched; download the images and give their paths")
    if source.startswith("file:"):
        path = Path(unquote(urlparse(source).path))
    else:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = base / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read it ({exc.strerror or exc})") from None


def describe_source(source: str) -> str:
    """A short form of a source for messages (a data: URL is not repeated whole)."""
    return source if not source.startswith("data:") else source[:40] + "..."


def column_images(cell: Any, column: str) -> list[tuple[str, bytes | None, str | None]]:
    """The images of one data.image_column cell: (label, bytes or None, path or None) each."""
    if cell is None:
        return []
    if hasattr(cell, "tolist") and not isinstance(cell, (bytes, bytearray)):
        cell = cell.tolist()
    items = cell if isinstance(cell, list) else [cell]
    out = []
    for i, item in enumerate(items):
        label = f"{column}[{i}]"
        if isinstance(item, (bytes, bytearray)):
            out.append((label, bytes(item), None))
        elif isinstance(item, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            data, path = item.get("bytes"), item.get("path")
            out.append((label, bytes(data) if data else None, path if isinstance(path, str) and path else None))
        elif isinstance(item, str):
            out.append((label, None, item))
        else:
            out.append((label, None, None))
    return out


def column_digest(cell: Any, column: str) -> bytes:
    """A hash of a data.image_column cell's images, for the row's uid (their bytes; a path where no bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for _, data, path in column_images(cell, column):
        h.update(data if data is not None else (path or "").encode())
        h.update(b"\0")
    return h.digest()


def load_images(sources: list[str | None], cell: Any, column: str | None, base: Path) -> list[ImageInput]:
    """Read a prompt's images in order: image parts' URLs/paths, None = the image column's next image.

    Raises BadImage naming the image's index and source."""
    from_column = column_images(cell, column) if column else []
    wanted = sum(s is None for s in sources)
    if wanted != len(from_column):
        where = f"data.image_column {column!r}" if column else "data.image_column (not set)"
        raise BadImage(
            f'the prompt has {wanted} {{"type": "image"}} part(s) without a source but {where} holds '
            f"{len(from_column)} image(s) for this row"
        )
    images, taken = [], iter(from_column)
    for i, source in enumerate(sources):
        if source is not None:
            try:
                images.append(ImageInput(describe_source(source), read_source(source, base)))
            except BadImage as exc:
                raise BadImage(f"image {i} ({describe_source(source)}): {exc}") from None
            continue
        label, data, path = next(taken)
        if data is None and path is None:
            raise BadImage(f"image {i} ({label}): the cell holds no image bytes or path")
        if data is None:
            try:
                data = read_source(path, base)
            except BadImage as exc:
                raise BadImage(f"image {i} ({label}, {path}): {exc}") from None
        images.append(ImageInput(label, data))
    return images


def prompt_images(
    messages: list[dict[str, Any]] | None, cell: Any, column: str | None, base: Path
) -> tuple[list[dict[str, Any]] | None, tuple[ImageInput, ...]]:
    """A normalized prompt's messages as the chat template takes them (image parts ``{"type": "image"}``) and
    its images, read (see load_images). A row whose prompt has no image parts must have none in the column."""
    if messages is None:
        sources: list[str | None] = []
    else:
        sources = [
            p["source"]
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image"
        ]
    if not sources and not (column and column_images(cell, column)):
        return messages, ()
    if messages is None:
        raise BadImage(
            f"a raw string prompt cannot take the images of data.image_column {column!r}; give chat messages"
        )
    images = load_images(sources, cell, column, base)
    rendered = [
        {**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    return rendered, tuple(images)


def decode(image: ImageInput) -> Any:
    """The image as an RGB PIL image; BadImage if its bytes are not an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImage(f"{image.source}: not a readable image ({exc})") from None


def decode_all(images: tuple[ImageInput, ...] | list[ImageInput]) -> list[Any]:
    out = []
    for i, image in enumerate(images):
        try:
            out.append(decode(image))
        except BadImage as exc:
            raise BadImage(f"image {i} ({exc})") from None
    return out


# ---------------------------------------------------------------------------------------------- work estimate
class ImageTokens:
    """Approximate prompt tokens of one image for the model's processor, from the image's width and height.

    - Qwen2-VL-style processors (``patch_size`` and ``merge_size`` in the processor config): the image is
      resized to multiples of f = patch_size x merge_size with its pixel count clamped to [min_pixels,
      max_pixels] (aspect ratio kept), then tokens = (h / f) x (w / f).
    - Fixed-size processors (CLIP, SigLIP: LLaVA and the like): (crop side / patch_size)^2, whatever the image,
      with patch_size from the processor or the model's vision_config.
    - Anything else: DEFAULT_IMAGE_TOKENS per image.
    Only the balance of shards depends on it; vLLM's own count is what the engine uses.
    """

    def __init__(self, model_dir: str | None) -> None:
        proc: dict[str, Any] = {}
        vision: dict[str, Any] = {}
        root = Path(model_dir) if model_dir else None
        if root is not None and root.is_dir():
            for name in ("preprocessor_config.json", "processor_config.json"):
                with contextlib.suppress(Exception):
                    loaded = json.loads((root / name).read_text())
                    proc = {**loaded.get("image_processor", {}), **loaded, **proc}
            with contextlib.suppress(Exception):
                vision = json.loads((root / "config.json").read_text()).get("vision_config") or {}
        self.patch = int(proc.get("patch_size") or vision.get("patch_size") or 0)
        self.merge = int(proc.get("merge_size") or 0)
        size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
        self.min_pixels = int(proc.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(proc.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        crop = proc.get("crop_size")
        side = crop.get("height") if isinstance(crop, dict) else crop
        self.side = int(side or vision.get("image_size") or 0)

    def __call__(self, width: int, height: int) -> int:
        if self.patch and self.merge:
            f = self.patch * self.merge
            h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
            if h * w > self.max_pixels:
                beta = math.sqrt(height * width / self.max_pixels)
                h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
            elif h * w < self.min_pixels:
                beta = math.sqrt(self.min_pixels / (height * width))
                h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
            return (h // f) * (w // f)
        if self.patch and self.side:
            return (self.side // self.patch) ** 2
        return DEFAULT_IMAGE_TOKENS

    def of_bytes(self, data: bytes | None) -> int:
        """Tokens of an image given by its bytes (only the header is read); the default if unreadable."""
        if not data:
            return DEFAULT_IMAGE_TOKENS
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                return self(*img.size)
        except Exception:
            return DEFAULT_IMAGE_TOKENS

    def of_path(self, path: Path) -> int:
        try:
            from PIL import Image

            with Image.open(path) as img:  # lazy: reads the header, not the pixels
                return self(*img.size)
        except Exception:  # missing or unreadable: the row becomes an error record at generation
            return 0


def row_image_tokens(cell: Any, image_cell: Any, column: str | None, base: Path, count: ImageTokens) -> int:
    """Estimated image tokens of one row (see ImageTokens); 0 for a text-only row. Never raises."""
    from hpcrollout.prompts import _as_mapping

    if isinstance(cell, bytes):
        cell = cell.decode("utf-8", errors="replace")
    if isinstance(cell, str) and cell.lstrip().startswith("[{"):  # a message list as JSON (CSV round trips)
        try:
            cell = json.loads(cell)
        except ValueError:
            return 0
    if hasattr(cell, "tolist"):
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)):
        return 0
    tokens = 0
    column_left = list(column_images(image_cell, column)) if column else []
    for msg in cell:
        msg = _as_mapping(msg)
        content = msg.get("content") if isinstance(msg, dict) else None
        if hasattr(content, "tolist"):
            content = content.tolist()
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            part = _as_mapping(part)
            if not is_image_part(part):
                continue
            try:
                source = image_part_source(part)
            except ValueError:
                continue
            if source is None:
                if column_left:
                    _, data, path = column_left.pop(0)
                    tokens += count.of_bytes(data) if data else count.of_path(base / path) if path else 0
            elif source.startswith("data:"):
                with contextlib.suppress(Exception):
                    tokens += count.of_bytes(read_source(source, base))
            elif not source.startswith(("http://", "https://")):
                path = Path(unquote(urlparse(source).path)) if source.startswith("file:") else Path(source)
                tokens += count.of_path(path if path.is_absolute() else base / path)
    return tokens
