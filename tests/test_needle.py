"""headinfer.needle: deterministic needle-in-a-haystack prompts and their scorer."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from headinfer.needle import QUESTION, filler_sentences, make_needle_prompt, needle_found


def test_filler_is_deterministic_varied_and_digit_free() -> None:
    first = list(itertools.islice(filler_sentences(0), 500))
    assert first == list(itertools.islice(filler_sentences(0), 500))
    assert first != list(itertools.islice(filler_sentences(1), 500))
    assert len(set(first)) > 300
    assert not any(re.search(r"\d", s) for s in first)


@pytest.mark.parametrize(
    ("answer", "found"),
    [
        (" 66226.", True),
        ("The secret number is 66226", True),
        ("66226", True),
        ("662260", False),
        ("166226", False),
        ("6622", False),
        ("", False),
    ],
)
def test_needle_found(answer: str, found: bool) -> None:
    assert needle_found(answer, "66226") is found


@pytest.mark.parametrize("num_tokens", [600, 7000])
def test_prompt_fits_its_budget(smollm2_tokenizer: Any, num_tokens: int) -> None:
    prompt = make_needle_prompt(smollm2_tokenizer, num_tokens)
    assert num_tokens - 32 <= prompt.num_tokens <= num_tokens
    assert tuple(prompt.input_ids.shape) == (1, prompt.num_tokens)
    ids = smollm2_tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.input_ids[0].tolist() == ids


def test_prompt_form(smollm2_tokenizer: Any) -> None:
    prompt = make_needle_prompt(smollm2_tokenizer, 2000, depth=0.25, seed=3)
    assert re.fullmatch(r"\d{5}", prompt.needle)
    assert prompt.text.count(prompt.needle_sentence) == 1
    assert prompt.text.count(prompt.needle) == 2  # the needle states it twice
    assert prompt.text.count(QUESTION) == 2  # asked before and after the haystack
    assert prompt.text.startswith("<|im_start|>system")
    assert prompt.text.endswith("<|im_start|>assistant\nThe secret number is")
    # The needle sits at about the requested depth of the haystack.
    start = prompt.text.index(QUESTION) + len(QUESTION)
    end = prompt.text.rindex(QUESTION)
    where = (prompt.text.index(prompt.needle_sentence) - start) / (end - start)
    assert where == pytest.approx(0.25, abs=0.03)


def test_prompt_is_deterministic(smollm2_tokenizer: Any) -> None:
    a = make_needle_prompt(smollm2_tokenizer, 1000, seed=5)
    b = make_needle_prompt(smollm2_tokenizer, 1000, seed=5)
    c = make_needle_prompt(smollm2_tokenizer, 1000, seed=6)
    assert a.text == b.text
    assert a.input_ids.equal(b.input_ids)
    assert a.needle != c.needle
    assert a.text != c.text


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_depth_extremes(smollm2_tokenizer: Any, depth: float) -> None:
    prompt = make_needle_prompt(smollm2_tokenizer, 800, depth=depth)
    body = prompt.text.split(QUESTION)[1]
    if depth == 0.0:
        assert body.split("\n\n")[1].startswith(prompt.needle_sentence)
    else:
        assert body.rstrip().endswith(prompt.needle_sentence)


def test_bad_arguments(smollm2_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="depth"):
        make_needle_prompt(smollm2_tokenizer, 1000, depth=1.5)
    with pytest.raises(ValueError, match="num_tokens"):
        make_needle_prompt(smollm2_tokenizer, 50)
