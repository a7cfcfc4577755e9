"""RULER samples: each task's generator (the haystack, needles and question from the sample's own
random state) and the fitting of a sample to its length (prompt plus the tokens to generate, with
the chat template), by a binary search on the haystack's size."""

from __future__ import annotations

import functools
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _common as common
from .haystack import KEY_WORDS, WORDS, essay_words, split_sentences, word_pool
from .tasks import DEPTHS, NEEDLE, NOISE, TASKS, TEMPLATES

__all__ = ["RulerSample", "make_sample"]


# ------------------------------------------------------------------------------------------
# Generators: build(n) gives (user text, answer prefix, references) with a haystack of size n.
# Everything but the haystack is drawn first from the sample's own RNG, so it is the same
# whatever n the fitting tries.

_Built = tuple[str, str, list[str]]


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(KEY_WORDS)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _insert_at_depths(sentences: list[str], inserts: list[str], depths: list[int]) -> str:
    # RULER: needles between sentences at the sampled depths (percent of the sentences).
    cuts = [0, *sorted(int(len(sentences) * d / 100) for d in depths), len(sentences)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(inserts):
            parts.append(inserts[i - 1])
    return " ".join(p for p in parts if p)


def _build_niah(args: dict[str, Any], seed: str, n: int) -> _Built:
    rng = random.Random(seed)
    num_k = max(args["num_needle_k"], args["num_needle_q"])
    num_v, num_q = args["num_needle_v"], args["num_needle_q"]
    kind_k, kind_v = args["type_needle_k"], args["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, kind_k))
        value = []
        for _ in range(num_v):
            value.append(_random_value(rng, kind_v))
            needles.append(NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=value[-1]))
        values.append(value)
    rng.shuffle(needles)
    indices = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    depths = rng.sample(DEPTHS, len(needles))

    haystack = args["type_haystack"]
    if haystack == "essay":
        context = _insert_at_depths(split_sentences(" ".join(essay_words(n))), needles, depths)
    else:
        if haystack == "noise":
            sentences = [NOISE] * n
        else:  # "needle": the haystack is distractor needles
            sentences = [
                NEEDLE.format(
                    type_needle_v=kind_v,
                    key=_random_value(rng, kind_k),
                    value=_random_value(rng, kind_v),
                )
                for _ in range(n)
            ]
        positions = sorted(rng.sample(range(n), len(needles)), reverse=True)
        for position, needle in zip(positions, needles):
            sentences.insert(position, needle)
        context = "\n".join(sentences)

    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]
    type_v = kind_v
    if num_q * num_v == 1:
        # RULER's singular wording, applied to the template and the answer prefix alike.
        def singular(text: str) -> str:
            for old, new in (
                ("Some", "A"),
                ("are all", "is"),
                ("are", "is"),
                ("answers", "answer"),
            ):
                text = text.replace(old, new)
            return text

        template, prefix, type_v = singular(template), singular(prefix), kind_v[:-1]
    user = template.format(type_needle_v=type_v, context=context, query=query)
    return user, prefix.format(type_needle_v=type_v, query=query), answers


def _vt_chain(rng: random.Random, num_hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain


def _vt_text(chain: list[str], names: list[str], n: int, rng: random.Random) -> tuple[str, str]:
    sentences = [NOISE] * n
    positions = sorted(rng.sample(range(len(sentences)), len(chain)))
    for j, position in enumerate(positions):
        sentences.insert(position + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    value = chain[0].split("=")[-1].strip()
    template, prefix = TEMPLATES["variable_tracking"]
    user = template.format(context=context, query=value)
    return user, prefix.format(num_v=len(names), query=value)


#: The worked example before a ``vt`` sample: RULER fits it to 500 tokens.
_VT_EXAMPLE_TOKENS = 500


def _build_vt(args: dict[str, Any], seed: str, n: int, icl_noise: int) -> _Built:
    rng = random.Random(seed)
    hops = args["num_hops"]
    icl_names, icl_chain = _vt_chain(rng, hops, 3)
    names, chain = _vt_chain(rng, hops, 5)
    icl_rng = random.Random(rng.random())
    example_user, example_prefix = _vt_text(icl_chain, icl_names, icl_noise, icl_rng)
    example = f"{example_user}{example_prefix}{' '.join(icl_names)}\n"
    user, prefix = _vt_text(chain, names, n, rng)
    return f"{example}\n{user}", prefix, names


def _cwe_example(
    rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_cw: int
) -> tuple[str, list[str]]:
    pool = WORDS if num_words <= len(WORDS) else word_pool(num_words)
    chosen = rng.sample(pool, num_words)
    common, uncommon = chosen[:num_cw], chosen[num_cw:]
    words = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words)), common


def _build_cwe(args: dict[str, Any], seed: str, n: int, length: int) -> _Built:
    rng = random.Random(seed)
    num_cw = args["num_cw"]
    if length < 4096:  # RULER: fewer repeats for short contexts
        shot = _cwe_example(rng, 20, 3, 1, num_cw)
        context, answer = _cwe_example(rng, n, 6, 1, num_cw)
    else:
        shot = _cwe_example(rng, 40, 10, 3, num_cw)
        context, answer = _cwe_example(rng, n, args["freq_cw"], args["freq_ucw"], num_cw)
    template, prefix = TEMPLATES["common_words_extraction"]
    shot_answer = " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot[1]))
    example = f"{template.format(context=shot[0])}{prefix} {shot_answer}"
    return f"{example}\n{template.format(context=context)}", prefix, answer


@functools.cache
def _zeta(alpha: float) -> float:
    # Riemann zeta for alpha > 1 (RULER uses scipy's): a partial sum and its tail's integral.
    terms = 100_000
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def _build_fwe(args: dict[str, Any], seed: str, n: int, length: int, new_tokens: int) -> _Built:
    rng = random.Random(seed)
    wordlen, alpha = args["coded_wordlen"], args["alpha"]
    vocab_size = max((length - new_tokens) // 50, 8)  # RULER: max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the top-ranked word is noise
    zeta = _zeta(alpha)
    counts = [int(n * (k**-alpha) / zeta) for k in range(1, len(words) + 1)]
    sampled = [w for w, c in zip(words, counts) for _ in range(c)]
    random.Random(rng.random()).shuffle(sampled)
    template, prefix = TEMPLATES["freq_words_extraction"]
    return template.format(context=" ".join(sampled)), prefix, words[1:4]


# ------------------------------------------------------------------------------------------
# Fitting a sample to its length


@dataclass(frozen=True)
class RulerSample:
    """One RULER sample, ready to run.

    Attributes:
        task: the task's name (a key of ``TASKS``).
        length: the requested length: prompt tokens plus ``max_new_tokens`` fit in it.
        index: the sample's number within (task, length).
        seed: the run's seed.
        text: the whole prompt (chat template applied, answer prefix at the end).
        input_ids: its token ids.
        references: the strings a correct answer contains.
        max_new_tokens: how many tokens to generate.
        haystack_size: the haystack's size the fitting found (sentences, words or needles).
    """

    task: str
    length: int
    index: int
    seed: int
    text: str
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    haystack_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def _fit(count: Callable[[int], int], budget: int, minimum: int, what: str) -> int:
    """The largest n >= minimum with count(n) <= budget (count grows roughly with n)."""
    if count(minimum) > budget:
        raise ValueError(
            f"{what}: {budget} tokens are too few for even the smallest haystack "
            f"({count(minimum)} tokens); ask for a longer length"
        )
    # Estimate from two sizes, then bracket and bisect; only sizes that were counted are kept.
    probe = minimum + 16
    base, step = count(minimum), count(probe)
    per_unit = max((step - base) / (probe - minimum), 1e-3)
    guess = max(minimum, int(minimum + (budget - base) / per_unit))
    good, bad = minimum, None
    if count(guess) <= budget:
        good = guess
        grow = max(guess // 16, 1)
        while bad is None:
            nxt = good + grow
            if count(nxt) <= budget:
                good, grow = nxt, grow * 2
            else:
                bad = nxt
    else:
        bad = guess
        shrink = max(guess // 16, 1)
        while True:
            nxt = max(bad - shrink, minimum)
            if nxt == minimum or count(nxt) <= budget:
                good = nxt
                break
            bad, shrink = nxt, shrink * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if count(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good


def make_sample(
    tokenizer: Any,
    task: str,
    length: int,
    index: int = 0,
    seed: int = 42,
    max_new_tokens: int | None = None,
) -> RulerSample:
    """Build RULER sample ``index`` of ``task`` at ``length`` tokens.

    The prompt is as long as fits: ``len(input_ids) + max_new_tokens <= length``, with the
    haystack at most one unit (a sentence, word or needle) short of overflowing.

    Args:
        tokenizer: the model's tokenizer (its chat template is used when it has one).
        task: a key of ``TASKS``.
        length: total tokens: prompt plus generated.
        index: which sample; (seed, task, length, index) determines it.
        seed: the run's seed.
        max_new_tokens: tokens to generate (default: the task's, as in RULER).

    Raises:
        ValueError: an unknown task, or a length too short for the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; the tasks are: {', '.join(TASKS)}")
    spec = TASKS[task]
    new_tokens = spec.tokens_to_generate if max_new_tokens is None else max_new_tokens
    if new_tokens <= 0:
        raise ValueError(f"max_new_tokens: must be positive, got {new_tokens}")
    key = f"headinfer-ruler/{seed}/{task}/{length}/{index}"
    budget = length - new_tokens

    def tokens_of(built: _Built) -> tuple[str, list[int]]:
        user, prefix, _ = built
        text = common.render_prompt(tokenizer, user, prefix)
        return text, common.encode(tokenizer, text)

    build: Callable[[int], _Built]
    minimum = 1
    if spec.kind == "niah":
        num_needles = max(spec.args["num_needle_k"], spec.args["num_needle_q"])
        minimum = num_needles * spec.args["num_needle_v"]

        def build(n: int) -> _Built:
            return _build_niah(spec.args, key, n)

    elif spec.kind == "variable_tracking":
        minimum = spec.args["num_hops"] + 1

        # RULER's worked example: as many noise sentences as fit in 500 tokens (with no model
        # template), and then the sample itself fitted around it.
        def example_tokens(m: int) -> int:
            names, chain = _vt_chain(random.Random(key), spec.args["num_hops"], 3)
            user, prefix = _vt_text(chain, names, m, random.Random(key))
            return len(tokenizer(user + prefix, add_special_tokens=False)["input_ids"])

        icl_noise = _fit(example_tokens, _VT_EXAMPLE_TOKENS, minimum, f"{task} example")

        def build(n: int) -> _Built:
            return _build_vt(spec.args, key, n, icl_noise)

    elif spec.kind == "common_words_extraction":
        minimum = spec.args["num_cw"] + 1

        def build(n: int) -> _Built:
            return _build_cwe(spec.args, key, n, length)

    else:
        minimum = 16

        def build(n: int) -> _Built:
            return _build_fwe(spec.args, key, n, length, new_tokens)

    size = _fit(lambda n: len(tokens_of(build(n))[1]), budget, minimum, task)
    built = build(size)
    text, ids = tokens_of(built)
    return RulerSample(
        task=task,
        length=length,
        index=index,
        seed=seed,
        text=text,
        input_ids=ids,
        references=list(built[2]),
        max_new_tokens=new_tokens,
        haystack_size=size,
    )
