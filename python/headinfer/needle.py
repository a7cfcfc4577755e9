"""Needle-in-a-haystack prompts: a long-context check that needs no network and no data set.

``make_needle_prompt(tokenizer, num_tokens=7000)`` hides one fact (a five-digit secret number)
at a chosen depth in deterministic filler text of generated everyday sentences, asks for it, and
formats the whole thing with the tokenizer's chat template. ``needle_found(answer, needle)``
scores a model's answer.

The form was tuned on SmolLM2-135M-Instruct (float32, standard attention, greedy decoding). With
it, the model retrieved the number from a 7K-token haystack in all 11 tries (seed 0 at depths
0.25 and 0.5; seeds 1 to 3 at depths 0.1, 0.5 and 0.9), and headinfer gives the same tokens.
Its parts:

- the question is asked before the haystack as well as after it (without that: a wrong number
  at depth 0.25);
- the needle states the fact twice: ``The secret number is N. Remember: the secret number is N.``
  (stated once: ``123456`` at depth 0.5);
- the filler contains no digits, so the number is the only one in the text;
- the answer is primed with ``The secret number is`` after the assistant's turn starts.

A "pass key" needle (``The pass key is N. Remember it. N is the pass key.``) was not retrieved
even at 2K tokens, in varied or in repeated filler.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NeedlePrompt",
    "filler_sentences",
    "make_needle_prompt",
    "needle_found",
]

_SUBJECTS = (
    "The old farmer", "A young painter", "The village baker", "My neighbour", "The tall sailor",
    "A quiet student", "The river guide", "The librarian", "An elderly poet", "The gardener",
    "A travelling merchant", "The blacksmith", "The shepherd", "A curious child", "The potter",
    "The mayor", "A weaver", "The fisherman", "The carpenter", "A street musician",
)  # fmt: skip
_VERBS = (
    "walked slowly along", "painted a picture of", "talked for hours about", "dreamed about",
    "wrote a long letter about", "sang a song about", "looked out over", "cleaned",
    "told a story about", "carried a basket past", "rested for a while near", "sketched",
    "remembered", "visited", "watched the birds above", "read a book beside",
)  # fmt: skip
_OBJECTS = (
    "the green hills", "the harbour", "the quiet market square", "the stone bridge",
    "the apple orchard", "the windmill", "the frozen lake", "the narrow lanes of the town",
    "the old lighthouse", "the wheat fields", "the pine forest", "the small chapel",
    "the busy train station", "the flower meadow", "the sandy beach", "the mountain pass",
)  # fmt: skip
_TAILS = (
    "in the early morning", "before the rain came", "while the sun was setting",
    "on a windy afternoon", "after a long day of work", "during the autumn fair",
    "under a cloudy sky", "as the bells rang", "late in the evening", "at the end of summer",
    "with a cheerful smile", "without saying a word", "in the middle of winter", "once again",
)  # fmt: skip
_ASIDES = (
    "The air smelled of fresh bread.", "Everyone agreed it was a lovely day.",
    "Nobody was in a hurry.", "The clouds drifted lazily across the sky.",
    "A dog barked somewhere in the distance.", "The tea was still warm.",
    "It was a day like any other.", "The leaves were turning gold and red.",
)  # fmt: skip

QUESTION = "What is the secret number?"
_INTRO = f"Question: {QUESTION} The answer is hidden in the text below.\n\n"
_ANSWER_PREFIX = "The secret number is"


@dataclass(frozen=True, eq=False)
class NeedlePrompt:
    """One needle-in-a-haystack prompt.

    Attributes:
        text: the whole prompt, chat template applied, ending with the primed answer start.
        input_ids: ``[1, num_tokens]`` int64 token ids of ``text`` (a ``torch.Tensor``).
        needle: the value to retrieve (a five-digit number, as a string).
        needle_sentence: the sentence hidden in the haystack.
        question: the question asked.
        depth: where the needle sits, as a fraction of the haystack's sentences (0: start).
        num_tokens: the prompt's length in tokens.
    """

    text: str
    input_ids: Any
    needle: str
    needle_sentence: str
    question: str
    depth: float
    num_tokens: int


def filler_sentences(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of varied everyday sentences with no digits in them."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.2:
            yield rng.choice(_ASIDES)
        else:
            subject, verb = rng.choice(_SUBJECTS), rng.choice(_VERBS)
            yield f"{subject} {verb} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def _render(tokenizer: Any, body: str) -> str:
    messages = [{"role": "user", "content": f"{_INTRO}{body}\n\n{QUESTION}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{text}{_ANSWER_PREFIX}"


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_needle_prompt(
    tokenizer: Any,
    num_tokens: int = 7000,
    depth: float = 0.5,
    seed: int = 0,
) -> NeedlePrompt:
    """Build a needle-in-a-haystack prompt of at most ``num_tokens`` tokens (a few fewer).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        num_tokens: the prompt's length budget in tokens; leave room for the answer within the
            model's positions (SmolLM2: 8192).
        depth: where to hide the needle, from 0.0 (start of the haystack) to 1.0 (end).
        seed: picks the secret number and the filler; the same seed gives the same prompt.

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``num_tokens`` too small for the question.
    """
    import torch

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    rng = random.Random(1000 + seed)
    needle = str(rng.randint(10000, 99999))
    needle_sentence = f"The secret number is {needle}. Remember: the secret number is {needle}."
    overhead = _count(tokenizer, _render(tokenizer, needle_sentence))
    if num_tokens < overhead + 16:
        raise ValueError(
            f"num_tokens must be at least {overhead + 16} for the question and needle, "
            f"got {num_tokens}"
        )

    # Sentences joined with spaces tokenize (almost) as the sum of " " + sentence.
    budget = num_tokens - overhead
    sentences: list[str] = []
    total = 0
    for sentence in filler_sentences(seed):
        length = _count(tokenizer, " " + sentence)
        if total + length > budget:
            break
        sentences.append(sentence)
        total += length

    while True:
        at = round(depth * len(sentences))
        body = " ".join([*sentences[:at], needle_sentence, *sentences[at:]])
        text = _render(tokenizer, body)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= num_tokens or not sentences:
            break
        sentences.pop()  # the joined text came out a little longer than counted

    return NeedlePrompt(
        text=text,
        input_ids=torch.tensor([ids], dtype=torch.long),
        needle=needle,
        needle_sentence=needle_sentence,
        question=QUESTION,
        depth=depth,
        num_tokens=len(ids),
    )


def needle_found(answer: str, needle: str) -> bool:
    """Whether ``answer`` contains ``needle`` as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(needle)}(?!\d)", answer) is not None
