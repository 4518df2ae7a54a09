from __future__ import annotations

import pytest

from hpcrollout.prompts import BadPrompt, derive_uid, normalize_prompt


def test_chat_and_text_prompts():
    msgs, text = normalize_prompt([{"role": "user", "content": "hi"}])
    assert msgs == [{"role": "user", "content": "hi"}] and text is None
    assert normalize_prompt("raw text") == (None, "raw text")
    assert normalize_prompt('[{"role": "user", "content": "json"}]')[0] == [{"role": "user", "content": "json"}]


def test_text_parts_are_joined():
    msgs, _ = normalize_prompt([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert msgs[0]["content"] == "ab"


@pytest.mark.parametrize(
    "cell, reason",
    [
        (None, "null"),
        ([], "empty message list"),
        ("   ", "empty string"),
        ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
        ([{"content": "x"}], "message 0 has no role"),
        ([{"role": "user"}], "no content"),
        ([{"role": "user", "content": None}], "content is null"),
        ([{"role": "user", "content": ""}], "every message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "part 0 is of type 'image_url'"),
        ([{"role": "user", "content": b"\xff\xfe"}], "not valid UTF-8"),
        (b"\xc3\x28", "not valid UTF-8"),
        (["just a string"], "message 0 is a str"),
        (42, "got int"),
    ],
)
def test_bad_prompts_name_the_problem(cell, reason):
    with pytest.raises(BadPrompt, match=reason.replace("(", r"\(")):
        normalize_prompt(cell)


def test_long_prompts_are_refused():
    with pytest.raises(BadPrompt, match="max_prompt_chars"):
        normalize_prompt([{"role": "user", "content": "x" * 101}], max_chars=100)


def test_uids_are_stable_and_position_dependent():
    p = [{"role": "user", "content": "same"}]
    assert derive_uid(3, p) == derive_uid(3, [{"role": "user", "content": "same"}])
    assert derive_uid(3, p) != derive_uid(4, p)
