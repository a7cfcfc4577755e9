"""RULER's synthetic tasks (``synthetic.yaml`` and ``constants.py``): each task's haystack,
needles, template, answer prefix, tokens to generate and metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEPTHS", "NEEDLE", "NOISE", "TASKS", "TEMPLATES", "TaskSpec"]


# ------------------------------------------------------------------------------------------
# Tasks: RULER's synthetic.yaml and constants.py


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task: its kind (RULER's task script), tokens to generate, arguments."""

    kind: str
    tokens_to_generate: int
    args: dict[str, Any] = field(default_factory=dict)
    metric: str = "all"  # "all": string_match_all; "part": string_match_part


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> TaskSpec:
    args = {
        "type_haystack": haystack,
        "type_needle_k": key,
        "type_needle_v": value,
        "num_needle_k": k,
        "num_needle_v": v,
        "num_needle_q": q,
    }
    return TaskSpec("niah", 128, args)


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": TaskSpec("variable_tracking", 30, {"num_chains": 1, "num_hops": 4}),
    "cwe": TaskSpec("common_words_extraction", 120, {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": TaskSpec("freq_words_extraction", 50, {"alpha": 2.0, "coded_wordlen": 6}),
}

TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
        "all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text."
        "\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the "
        "text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assigned the value {query}, they are: ",
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
        "common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the "
        "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
        "explanation. Please ignore the dots '....'. What are the three most frequently "
        "appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: RULER's needle depths in percent: np.round(np.linspace(0, 100, 40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]
