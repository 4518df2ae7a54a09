"""Image prompts (hpcrollout/images.py) on the transformers backend with a tiny random LLaVA: every way of giving
an image (a path relative to the input, file://, data:, data.image_column bytes and {bytes, path} structs)
renders the same image, a missing or unreadable image fails its row only, naming the row and the image; the
work estimate counts image tokens; the uid hashes the column's image bytes. The vLLM side is in
test_vllm_admission.py, against its stand-in."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.config import build_config
from hpcrollout.engines.base import PromptRequest
from hpcrollout.engines.transformers_engine import TransformersEngine
from hpcrollout.errors import HpcRolloutError
from hpcrollout.images import ImageInput, ImageTokens
from hpcrollout.shard import open_input, prepare_run, scan_input
from tests.conftest import make_config, make_prompts, write_input

QUESTION = "What is in the picture?"


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def image_prompt(*parts: dict) -> list[dict]:
    """One user message: the image parts, then the question (parts as Parquet structs hold them)."""
    filled = [{"type": p["type"], "image_url": p.get("image_url"), "text": None} for p in parts]
    return [{"role": "user", "content": [*filled, {"type": "text", "image_url": None, "text": QUESTION}]}]


def url(u: str) -> dict:
    return {"type": "image_url", "image_url": {"url": u}}


COLUMN = {"type": "image"}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image feature


def test_image_prompts_end_to_end_through_hpcrollout_run(tmp_path, tiny_vlm):
    """input Parquet with image prompts -> hpcrollout run -> merged output: the same red image given five ways
    gives the same greedy response and 16 more prompt tokens than the question alone; bad images are error
    rows naming the row and the image; the rest of the shard goes on."""
    (tmp_path / "imgs").mkdir()
    red = png((200, 10, 10))
    (tmp_path / "imgs" / "red.png").write_bytes(red)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    data_url = "data:image/png;base64," + base64.b64encode(red).decode()
    rows = [
        (image_prompt(url("imgs/red.png")), None),  # relative to the input file's directory
        (image_prompt(url(f"file://{tmp_path}/imgs/red.png")), None),
        (image_prompt(url(data_url)), None),
        (image_prompt(COLUMN), [{"bytes": red, "path": None}]),
        (image_prompt(COLUMN), [{"bytes": None, "path": "imgs/red.png"}]),
        ([{"role": "user", "content": [{"type": "text", "image_url": None, "text": QUESTION}]}], None),
        (image_prompt(url("imgs/missing.png")), None),
        (image_prompt(url("imgs/broken.png")), None),
        (image_prompt(COLUMN), None),  # a placeholder without an image in the column
    ]
    schema = pa.schema(
        [
            ("prompt", pa.Table.from_pylist([{"prompt": rows[0][0]}]).schema.field("prompt").type),
            ("img", pa.list_(IMAGE_TYPE)),
        ]
    )
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "img": c} for p, c in rows], schema=schema), inp)
    out = tmp_path / "out.parquet"
    cmd = [
        sys.executable,
        "-m",
        "hpcrollout",
        "run",
        "--model_path",
        str(tiny_vlm),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--n_samples",
        "1",
        "--max_tokens",
        "6",
        "--backend",
        "transformers",
        "--set",
        "data.image_column=img",
        "--set",
        "sampling.temperature=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = pq.read_table(out).to_pylist()
    good = merged[:5]
    assert [r["error"] for r in good] == [None] * 5
    assert {tuple(r["responses"]) for r in good} == {tuple(good[0]["responses"])}  # one image, five ways
    assert [r["prompt_tokens"] for r in good] == [merged[5]["prompt_tokens"] + 16] * 5
    assert merged[5]["error"] is None and merged[5]["responses"]
    assert merged[6]["error"] == (
        f"bad image: row 6, image 0 (imgs/missing.png): {tmp_path}/imgs/missing.png: cannot read it "
        "(No such file or directory)"
    )
    assert merged[7]["error"].startswith("bad image: row 7, image 0 (imgs/broken.png: not a readable image")
    assert merged[8]["error"].startswith(
        'bad image: row 8, the prompt has 1 {"type": "image"} part(s) without a source but data.image_column '
        "'img' holds 0 image(s)"
    )
    assert all(r["responses"] == [] for r in merged[6:])


def request(row: int, messages, *images: ImageInput) -> PromptRequest:
    return PromptRequest(f"u{row}", row, messages, None, row, images=tuple(images))


def test_two_images_and_a_broken_one_on_the_engine(tmp_path, tiny_vlm):
    config = make_config(tmp_path, tiny_vlm, tmp_path / "unused.parquet", sampling={"n": 2, "max_tokens": 3})
    engine = TransformersEngine(config)
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    one = [{"role": "user", "content": [{"type": "image"}]}]
    results = list(
        engine.generate(
            [
                request(0, two, ImageInput("a", png((1, 2, 3))), ImageInput("b", png((9, 9, 9), (300, 100)))),
                request(1, one, ImageInput("c.png", b"\x89PNG garbage")),
            ]
        )
    )
    assert results[0].error is None and len(results[0].samples) == 2
    assert results[0].prompt_tokens == len(engine.tokenizer(engine.renderer.render(two))["input_ids"]) + 2 * 15
    assert results[1].error.startswith("bad image: row 1, image 0 (c.png: not a readable image")


def test_image_prompts_on_a_text_only_model_say_so(tmp_path, tiny_model):
    engine = TransformersEngine(make_config(tmp_path, tiny_model, tmp_path / "unused.parquet"))
    with pytest.raises(
        HpcRolloutError,
        match=r"^model.path: the input has image prompts, but .* is a text-only model; image prompts need a vision",
    ):
        list(
            engine.generate(
                [request(0, [{"role": "user", "content": [{"type": "image"}]}], ImageInput("a", png((1, 1, 1))))]
            )
        )


def test_malformed_image_parts_are_error_rows(tmp_path, tiny_model):
    """Without the model's help: an image_url part without a url, an http URL, a raw string prompt given
    column images; text-only rows of the same input run."""
    from hpcrollout.merge import merge_run
    from hpcrollout.worker import run_task

    rows = [
        {"prompt": json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "img": None},
        {"prompt": json.dumps([{"role": "user", "content": [url("https://example.com/a.png")]}]), "img": None},
        {"prompt": "a raw prompt", "img": png((1, 1, 1))},
        {"prompt": json.dumps([{"role": "user", "content": "plain text"}]), "img": None},
    ]
    inp = write_input(tmp_path / "in.parquet", rows)
    config = make_config(
        tmp_path, tiny_model, inp, data={"input": str(inp), "image_column": "img"}, sampling={"n": 1, "max_tokens": 2}
    )
    run_task(prepare_run(config).root, 0)
    merge_run(tmp_path / "run", tmp_path / "m.parquet")
    errors = [r["error"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist()]
    assert (
        errors[0] == "bad prompt: message 0: content part 0: image_url part without a url "
        '(expected {"type": "image_url", "image_url": {"url": ...}})'
    )
    assert errors[1] == (
        "bad image: row 1, image 0 (https://example.com/a.png): http(s) image URLs are not "
        "fetched; download the images and give their paths"
    )
    assert errors[2].startswith("bad image: row 2, a raw string prompt cannot take the images of data.image_column")
    assert errors[3] is None


def test_a_missing_image_column_is_refused_before_the_run(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    config = make_config(tmp_path, tiny_model, inp, data={"input": str(inp), "image_column": "pictures"})
    with pytest.raises(HpcRolloutError, match=r"has no column 'pictures' \(data.image_column\)"):
        prepare_run(config)


def test_the_work_estimate_counts_image_tokens(tmp_path, tiny_vlm):
    (tmp_path / "red.png").write_bytes(png((200, 10, 10)))
    rows = [
        {"prompt": image_prompt(url("red.png")), "img": None},
        {"prompt": image_prompt(url("red.png"), url("red.png")), "img": None},
        {"prompt": image_prompt(COLUMN), "img": [{"bytes": png((1, 1, 1)), "path": None}]},
        {"prompt": [{"role": "user", "content": [{"type": "text", "image_url": None, "text": QUESTION}]}], "img": None},
    ]
    inp = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [("prompt", pa.Table.from_pylist(rows[:1]).schema.field("prompt").type), ("img", pa.list_(IMAGE_TYPE))]
            ),
        ),
        inp,
    )
    config = make_config(tmp_path, tiny_vlm, inp, data={"input": str(inp), "image_column": "img"})
    work = scan_input(open_input(inp), inp, config)
    assert np.allclose(work[:3] - work[3], [16, 32, 16])  # (56 / 14)^2 tokens an image


def test_the_work_estimate_counts_images_in_json_string_prompts(tmp_path, tiny_vlm):
    """Prompts stored as JSON strings (what CSV round trips produce): the rows naming an image part are parsed
    and their images counted, 16 tokens each; a missing image counts nothing (its row fails at generation)."""
    (tmp_path / "red.png").write_bytes(png((200, 10, 10)))

    def prompt(u: str) -> str:
        return json.dumps([{"role": "user", "content": [url(u), {"type": "text", "text": QUESTION}]}])

    inp = tmp_path / "in.parquet"
    rows = [prompt("red.png"), prompt("nop.png"), json.dumps([{"role": "user", "content": QUESTION}])]
    pq.write_table(pa.table({"prompt": rows}), inp)
    config = make_config(tmp_path, tiny_vlm, inp, data={"input": str(inp)})
    work = scan_input(open_input(inp), inp, config)
    assert len(rows[0]) == len(rows[1]) and work[0] - work[1] == pytest.approx(16)


def test_image_tokens_follow_the_qwen2_vl_resize_rule(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"patch_size": 14, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 100})
    )
    count = ImageTokens(str(tmp_path))
    assert count(280, 280) == 100  # 10 x 10 cells of 28 pixels
    assert count(20, 20) == 4  # raised to min_pixels: 56 x 56
    assert count(2800, 1400) == 98  # lowered to max_pixels, aspect kept: 14 x 7 cells
    assert ImageTokens(None)(100, 100) == 256  # no processor config: the default


def test_image_tokens_match_the_tiny_qwen2_vl_processor(tmp_path):
    """The Qwen2-VL that the GPU image test loads in vLLM (tinymodel.build_tiny_qwen2_vl): the work estimate
    counts, for images of several sizes, the merged patches that its own image processor makes of them."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from hpcrollout.tinymodel import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(tmp_path / "qwen2vl")
    processor = AutoImageProcessor.from_pretrained(str(model))
    count = ImageTokens(str(model))
    for size in [(40, 30), (56, 56), (300, 120), (1000, 1000), (17, 900)]:
        grid = processor(images=[Image.new("RGB", size, (9, 9, 9))], return_tensors="np")["image_grid_thw"]
        assert count(*size) == int(np.prod(grid[0])) // 4, size  # 2 x 2 patches merged into one token
    assert count(40, 30) == 6  # 40 x 30 raised to min_pixels (4 cells): 84 x 56


def test_the_uid_hashes_the_image_column_bytes(tmp_path, tiny_model):
    def uids(picture: bytes) -> list[str]:
        rows = [{"prompt": json.dumps(image_prompt(COLUMN)), "img": picture}]
        inp = write_input(tmp_path / "in.parquet", rows)
        config = make_config(
            tmp_path,
            tiny_model,
            inp,
            data={"input": str(inp), "image_column": "img"},
            run_dir=str(tmp_path / f"run-{len(list(tmp_path.iterdir()))}"),
        )
        rundir = prepare_run(config)
        return pq.read_table(rundir.shard_input(0)).column("_hpcr_uid").to_pylist()

    assert uids(png((1, 1, 1))) == uids(png((1, 1, 1)))
    assert uids(png((1, 1, 1))) != uids(png((2, 2, 2)))


def test_image_keys_are_fingerprinted_only_when_set(tmp_path):
    base = build_config({"model": {"path": "m"}})
    assert build_config({"model": {"path": "m"}, "data": {"image_column": None}}).generation_fingerprint() == (
        base.generation_fingerprint()
    )
    with_images = build_config({"model": {"path": "m"}, "data": {"image_column": "img"}})
    assert with_images.generation_fingerprint()["data"] != base.generation_fingerprint()["data"]


def test_export_keeps_image_parts_as_the_input_gave_them():
    from hpcrollout.export import _chat_record

    prompt = [{"role": "user", "content": [url("imgs/a.png"), COLUMN, {"type": "text", "text": "Which?"}]}]
    record = _chat_record({"prompt": prompt, "response": "A"}, "prompt", "messages", ())
    assert record["messages"] == [
        {"role": "user", "content": [url("imgs/a.png"), COLUMN, {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": "A"},
    ]


def test_relative_image_paths_resolve_against_the_inputs_directory_or_image_dir(tmp_path):
    from hpcrollout.images import image_base, image_part_source

    (tmp_path / "d").mkdir()
    cases = {
        str(tmp_path / "d" / "in.parquet"): tmp_path / "d",  # a file: its directory
        str(tmp_path / "d"): tmp_path / "d",  # a directory input: itself
        str(tmp_path / "d" / "part-*.parquet"): tmp_path / "d",  # a glob: before the first wildcard
    }
    for spec, expected in cases.items():
        assert image_base(build_config({"data": {"input": spec}})) == expected
    assert image_base(build_config({"data": {"input": spec, "image_dir": "/imgs"}})) == Path("/imgs")
    # transformers' chat form names the source in the image part itself
    assert image_part_source({"type": "image", "image": "a.png"}) == "a.png"
    assert image_part_source({"type": "image", "url": "file:///a.png"}) == "file:///a.png"
    assert (
        image_part_source({"type": "image_url", "image_url": "data:image/png;base64,AA"}) == "data:image/png;base64,AA"
    )
    assert image_part_source({"type": "image"}) is None
