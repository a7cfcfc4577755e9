"""RULER's synthetic tasks, generated locally, run through headinfer (and standard attention).

``python -m headinfer.eval.ruler --lengths 1024,4096 --compare standard`` builds RULER samples
(Hsieh et al., 2024, https://github.com/NVIDIA/RULER) with the model's own tokenizer at each
length, runs them by greedy decoding through headinfer, and prints RULER's scores per task and
length; ``--compare standard`` also runs the same model unpatched on the same samples and prints
both scores side by side with the share of identical outputs.

The tasks follow RULER's ``synthetic.yaml`` and ``constants.py`` (templates, answer prefixes,
tokens to generate, needle formats, haystacks):

- ``niah_single_1``: one number needle in the noise haystack ("The grass is green. ...").
- ``niah_single_2``, ``niah_single_3``: one needle (a number; a UUID) in an essay haystack.
- ``niah_multikey_1``: the needle among 3 distractor needles with other keys, essay haystack;
  ``niah_multikey_2``: the haystack is made of distractor needles; ``niah_multikey_3``: the
  same with UUIDs as keys and values.
- ``niah_multivalue``: 4 values for one key; ``niah_multiquery``: 4 keys queried.
- ``vt``: variable tracking, one chain of 4 hops ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE")
  in the noise haystack, after one worked example, as RULER adds it.
- ``cwe``: common words extraction (10 words repeated 30 times among words repeated 3 times; 6
  and 1 below 4096 tokens), after one worked example.
- ``fwe``: frequent words extraction from coded six-letter words drawn from a Zipf (alpha 2)
  distribution; the three most frequent after the top one ("...", noise) are the answer.

Differences from RULER, all because nothing is downloaded: the essay haystack is generated text
in the style of an essay (RULER uses Paul Graham's essays); needle keys and common words come
from a fixed word list in this file (RULER uses the ``wonderwords`` lists), extended by
generated pronounceable words where a long ``cwe`` sample needs more; the QA tasks (SQuAD,
HotpotQA) are left out. Each sample is fitted to its length (prompt plus ``max_new_tokens``, with
the chat template when the tokenizer has one) by a binary search on the haystack's size; the
answer prefix is placed after the assistant's turn opens, as RULER does, with surrounding spaces
stripped. A sample is determined by (seed, task, length, index).

Scoring is RULER's: predictions are stripped of control characters, and a sample scores the
fraction of its reference strings found in the prediction, ignoring case (``string_match_all``;
``string_match_part``, 1 if any is found, is what RULER uses for QA). A task's score is the mean
over its samples, times 100.
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import re
import string
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..distributed import is_main_rank
from . import _common as common
from ._common import Generator, load_model

__all__ = [
    "TASKS",
    "RulerSample",
    "TaskSpec",
    "main",
    "make_sample",
    "postprocess_pred",
    "sample_score",
    "string_match_all",
    "string_match_part",
]

logger = logging.getLogger("headinfer.eval.ruler")


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

_TEMPLATES = {
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


# ------------------------------------------------------------------------------------------
# Words: a fixed list (RULER draws from wonderwords' nouns, adjectives and verbs)

_ADJECTIVES = """
able absent active actual afraid agile alert alive ancient angry anxious awake aware bad bare
basic bitter black blank blue bold bored brave brief bright brisk broad broken brown busy calm
careful cheap cheerful clean clear clever close cloudy coarse cold common cool cosmic crazy
crisp cruel curious damp dark dear deep dense direct dirty distant dizzy dry dull dusty eager
early easy elegant empty equal even exact faint fair false famous fancy fast fat fertile fierce
final fine firm flat fluffy foggy formal fragile free fresh friendly frozen full funny gentle
giant glad gloomy golden good grand gray great green grumpy happy hard harsh healthy heavy
hidden high hollow honest huge humble hungry icy idle jolly juicy keen kind large late lazy
light little lively local lonely long loose loud lucky mad magic major messy mild minor modern
moist narrow nasty neat nervous new nice noble noisy normal odd old open orange pale patient
plain plastic pleasant polite poor proud purple quick quiet rapid rare raw ready real red rich
rigid ripe rough round royal rude rural rusty sad safe salty shallow sharp shiny short shy
silent silly simple slim slow small smooth soft solid sour spare spicy steady steep sticky stiff
strange strict strong sturdy sudden sunny super sweet swift tall tame tender thick thin tidy
tiny tired tough tricky true ugly upset urban vast violet vivid warm weak wealthy weary wet
white whole wicked wide wild wise witty wooden young zealous
"""
_NOUNS = """
acorn actor airport anchor angle animal answer apple apron arch army arrow artist attic author
avenue baby bag bakery ball balloon banana band bank barn basket bath beach bean bear bed bee
bell bench berry bicycle bird blanket boat body bone book boot bottle box branch bread brick
bridge brother brush bubble bucket building bulb butter button cabin cable cake camera camp
candle canoe canyon captain car carpet carrot castle cat cave ceiling chain chair chalk cheese
cherry chest chicken child chimney church circle city cliff clock cloud coast coat coffee coin
comet cookie copper corn cottage cotton country cousin cow crayon creek crown cup curtain
cushion daisy dancer desert desk diamond dinner doctor dog doll dolphin door dragon drawer
dream dress drum duck eagle earth egg elbow engine eye fabric face falcon farm feather fence
field finger fire fish flag flame flute fog forest fork fountain fox frog fruit garden gate
ghost giraffe glass glove goat gold grape grass guitar hammer hand harbor hat hawk heart helmet
hill honey horse hotel house island jacket jar jelly jewel juice kettle key king kitchen kite
knee knife ladder lake lamp lantern leaf lemon letter library lion lizard lock machine magnet
map marble market meadow melon mirror monkey moon mountain mouse mug needle nest night ocean
office onion orchard otter owl paint palace pan paper parrot pearl pencil pepper piano pillow
pilot planet plate pocket pond potato puzzle queen rabbit radio rain river road robot rock roof
rope rose sail salad sand scarf school sea shadow sheep shell ship shoe shovel silver singer
sister sky snake snow sock sofa spider spoon square stamp star station stone storm stove
street sugar sun swan table tail teacher tent thunder tiger toast tomato tower town toy train
tree truck tulip tunnel turtle umbrella valley vase village violin wagon wall water whale wheel
window wing winter wolf worm yard zebra
"""
_VERBS = """
accept add admire agree allow answer appear arrive ask bake balance bathe beg behave belong
blink boil borrow bounce breathe brush build bump burn call carry catch change chase cheer
chew clap climb collect comb compare complain cook count cover crawl cross cry cycle dance
decide deliver depend describe dig discover dive drag draw dream drink drive drop dry earn eat
enjoy enter escape explain explore fail fetch fill find fix float fly fold follow forget gather
glow grab greet grin grow guard guess hang happen hate help hide hop hug hunt hurry imagine
invent invite join juggle jump kick kneel knit knock laugh learn lend lift listen live look
love march mark marry measure melt mend mix move nod notice obey offer open order paint pack
pass pause peel pick plant play point pour pray preach prefer press print promise pull push
race rain reach read relax remember repeat reply rescue rest return ride ring roll rub run
rush sail save scream search sell send sew shake share shine shop shout sing sink sit skate
sketch ski sleep slide smell smile sneeze snore solve sort spell spill spin spray squeeze stare
start stay steer step stir stop stretch study swim swing talk taste teach tease tell thank
think throw tickle touch trace trade travel trust try turn type visit wait walk wander want
warn wash watch wave weigh whisper whistle win wink wish wonder work worry write yawn yell
"""

ADJECTIVES = sorted(set(_ADJECTIVES.split()))
NOUNS = sorted(set(_NOUNS.split()))
VERBS = sorted(set(_VERBS.split()))
#: Real words for ``cwe``, as RULER's wonderwords nouns + adjectives + verbs.
WORDS = sorted(set(ADJECTIVES) | set(NOUNS) | set(VERBS))
#: Needle keys ("words"): adjective-noun pairs, as RULER's.
KEY_WORDS = [f"{adj}-{noun}" for adj in ADJECTIVES for noun in NOUNS]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_EXTRA_WORDS: list[str] = []


def word_pool(size: int) -> list[str]:
    """At least ``size`` distinct lowercase words: ``WORDS``, then generated pronounceable
    three-syllable words (always the same ones, in the same order)."""
    if len(WORDS) + len(_EXTRA_WORDS) < size:
        rng = random.Random("headinfer-ruler-words")
        seen = set(WORDS)
        extra: list[str] = []
        while len(WORDS) + len(extra) < size:
            word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
            if word not in seen:
                seen.add(word)
                extra.append(word)
        _EXTRA_WORDS[:] = extra
    return WORDS + _EXTRA_WORDS[: max(size - len(WORDS), 0)]


# ------------------------------------------------------------------------------------------
# The essay haystack: generated essay-like prose, the same for every sample

_ESSAY_OPENERS = (
    "", "", "", "", "In my experience, ", "Oddly enough, ", "Of course, ", "I think ",
    "The surprising thing is that ", "What this means is that ", "In practice, ",
    "Most of the time, ", "It turns out that ", "Historically, ", "If you look closely, ",
    "For better or worse, ", "Back in 2005, ", "By 1998, ", "Even now, ", "As a rule, ",
)  # fmt: skip
_ESSAY_SUBJECTS = (
    "startups", "good programmers", "most founders", "investors", "big companies",
    "good writers", "students", "painters", "the best hackers", "young people",
    "people who make things", "small teams", "experienced engineers", "most essays",
    "new ideas", "cities", "universities", "good products", "ambitious people", "users",
)  # fmt: skip
_ESSAY_VERBS = (
    "tend to underestimate", "rarely think about", "learn the most from", "are surprised by",
    "end up depending on", "almost never notice", "quietly care about", "spend years avoiding",
    "are judged by", "grow out of", "get better at", "are shaped by", "keep returning to",
    "seldom talk about", "can't fake", "should pay more attention to",
)  # fmt: skip
_ESSAY_OBJECTS = (
    "how much work it takes", "the problems they actually have", "what users want",
    "the questions nobody asks", "the power of small groups", "the cost of meetings",
    "the value of writing things down", "what they do on weekends", "the habits of the rich",
    "ideas that seem like toys", "the details of the work", "their own taste",
    "doing things that don't scale", "the shape of the market", "the people around them",
    "the rules of thumb they inherited", "the difference between making and managing",
)  # fmt: skip
_ESSAY_TAILS = (
    ".", ".", ".", ", and that is usually a mistake.", ", which is why so few succeed.",
    ", at least at first.", " more than they admit.", ", whether they like it or not.",
    " in ways that are hard to see.", ", and the reasons are worth thinking about.",
    " long before anyone else does.", ", though it rarely shows.",
)  # fmt: skip
_ESSAY_ASIDES = (
    "That is the hard part.", "This is not obvious.", "Nobody tells you this.",
    "I learned this the hard way.", "It sounds strange, but it works.",
    "The answer is simpler than it looks.", "There are exceptions, of course.",
    "Most advice gets this backwards.", "Few people realize how much this matters.",
)  # fmt: skip
_ESSAY_WORDS: list[str] = []


def essay_words(count: int) -> list[str]:
    """The first ``count`` words of the essay haystack (a fixed, endless stream of prose)."""
    if len(_ESSAY_WORDS) < count:
        rng = random.Random("headinfer-ruler-essay")
        words: list[str] = []
        while len(words) < count + 1000:
            if rng.random() < 0.15:
                sentence = rng.choice(_ESSAY_ASIDES)
            else:
                opener, subject = rng.choice(_ESSAY_OPENERS), rng.choice(_ESSAY_SUBJECTS)
                if not opener:
                    subject = subject[0].upper() + subject[1:]
                sentence = (
                    f"{opener}{subject} {rng.choice(_ESSAY_VERBS)} "
                    f"{rng.choice(_ESSAY_OBJECTS)}{rng.choice(_ESSAY_TAILS)}"
                )
            words.extend(sentence.split(" "))
        _ESSAY_WORDS[:] = words
    return _ESSAY_WORDS[:count]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


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
        context = _insert_at_depths(_sentences(" ".join(essay_words(n))), needles, depths)
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
    template, prefix = _TEMPLATES["niah"]
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
    template, prefix = _TEMPLATES["variable_tracking"]
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
    template, prefix = _TEMPLATES["common_words_extraction"]
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
    template, prefix = _TEMPLATES["freq_words_extraction"]
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


# ------------------------------------------------------------------------------------------
# Scoring: RULER's scripts/eval/synthetic/constants.py and evaluate.py

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, ends stripped."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def sample_score(prediction: str, references: Sequence[str], metric: str = "all") -> float:
    """One sample's score in [0, 1]: the fraction of ``references`` found in ``prediction``
    (``"all"``), or 1 if any of them is (``"part"``); case is ignored."""
    if not references:
        raise ValueError("references: empty")
    found = [ref.lower() in prediction.lower() for ref in references]
    if metric == "all":
        return sum(found) / len(found)
    if metric == "part":
        return float(any(found))
    raise ValueError(f"metric: 'all' or 'part', got {metric!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean over samples of the fraction of references found, x100,
    rounded to 2 decimals."""
    score = sum(sample_score(p, r, "all") for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part`` (its QA metric): share of samples with any reference found,
    x100, rounded to 2 decimals."""
    score = sum(sample_score(p, r, "part") for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


# ------------------------------------------------------------------------------------------
# The runner


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _task_list(text: str) -> list[str]:
    tasks = [part.strip() for part in text.split(",") if part.strip()]
    if tasks == ["all"]:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(unknown) if unknown else repr(text)}; "
            f"the tasks are: {', '.join(TASKS)}"
        )
    return tasks


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m headinfer.eval.ruler",
        description="RULER's synthetic tasks, generated locally with the model's tokenizer, "
        "through headinfer; --compare standard also runs standard attention on the same "
        "samples.",
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--lengths",
        type=_int_list,
        default=[1024, 2048, 4096],
        help="sequence lengths in tokens, prompt plus generated (default 1024,2048,4096)",
    )
    parser.add_argument(
        "--tasks",
        type=_task_list,
        default=list(TASKS),
        help=f"comma-separated tasks, or 'all' (default): {', '.join(TASKS)}",
    )
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length (10)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: each task's RULER value, 30 to 128)",
    )
    parser.add_argument("--seed", type=int, default=42, help="sample seed (42, as RULER)")
    parser.add_argument(
        "--compare",
        choices=["standard"],
        default=None,
        help="also run standard attention (the model unpatched) and compare",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write one JSON line per sample here, and the scores with the run's settings and "
        "versions beside it (results.jsonl -> results.json)",
    )
    return parser


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.2f}"


def _print_table(
    rows: list[dict[str, Any]], lengths: list[int], tasks: list[str], title: str, compare: bool
) -> None:
    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values) * 100, 2) if values else None

    print(title)
    header = f"{'task':<18}{'length':>8}{'samples':>9}{'headinfer':>11}"
    if compare:
        header += f"{'standard':>10}{'identical':>11}"
    print(header)
    print("-" * len(header))
    for length in lengths:
        task_scores: list[tuple[float | None, float | None]] = []
        for task in tasks:
            mine = [r for r in rows if r["task"] == task and r["length"] == length]
            score = mean([r["score"] for r in mine])
            line = f"{task:<18}{length:>8}{len(mine):>9}{_fmt(score):>11}"
            ref = None
            if compare:
                ref = mean([r["standard_score"] for r in mine])
                same = sum(r["identical"] for r in mine)
                line += f"{_fmt(ref):>10}{f'{same}/{len(mine)}':>11}"
            task_scores.append((score, ref))
            print(line)
        if len(tasks) > 1:
            avg = [s for s, _ in task_scores if s is not None]
            line = (
                f"{'average':<18}{length:>8}{'':>9}{_fmt(sum(avg) / len(avg) if avg else None):>11}"
            )
            if compare:
                refs = [r for _, r in task_scores if r is not None]
                line += f"{_fmt(sum(refs) / len(refs) if refs else None):>10}"
            print(line)
    if compare and rows:
        same = sum(r["identical"] for r in rows)
        print(f"identical outputs: {same}/{len(rows)} ({same / len(rows):.2f})")


def scores(rows: list[dict[str, Any]], compare: bool) -> dict[str, Any]:
    """Scores per task and length (``{task: {length: {...}}}``, lengths as strings): the mean
    score times 100, the number of samples, and with ``compare`` the standard attention's score
    and how many outputs were identical."""
    table: dict[str, Any] = {}
    for row in rows:
        cell = table.setdefault(row["task"], {}).setdefault(str(row["length"]), [])
        cell.append(row)
    results: dict[str, Any] = {}
    for task, by_length in table.items():
        results[task] = {}
        for length, cell in by_length.items():
            entry: dict[str, Any] = {
                "score": round(sum(r["score"] for r in cell) / len(cell) * 100, 2),
                "samples": len(cell),
            }
            if compare:
                entry["standard_score"] = round(
                    sum(r["standard_score"] for r in cell) / len(cell) * 100, 2
                )
                entry["identical"] = sum(bool(r["identical"]) for r in cell)
            results[task][length] = entry
    return results


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run RULER; print the scores table to stdout. Returns 0."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "samples", "max_new_tokens", "chunk_size")
    device, dtype = common.run_setup(args)
    try:
        model, tokenizer = load_model(args.model, device, dtype, args.gpus)
    except ValueError as exc:
        parser.error(f"--{exc}")
    positions = common.model_positions(model)
    if positions is not None and max(args.lengths) > positions:
        parser.error(
            f"--lengths: {max(args.lengths)} is more than the model's {positions} positions"
        )

    jobs = [(n, t, i) for n in args.lengths for t in args.tasks for i in range(args.samples)]
    samples: list[RulerSample] = []
    for length, task, index in tqdm(jobs, desc="building samples", unit="sample", file=sys.stderr):
        try:
            sample = make_sample(tokenizer, task, length, index, args.seed, args.max_new_tokens)
        except ValueError as exc:
            parser.error(f"--lengths: {length}: {exc}")
        samples.append(sample)

    compare = args.compare == "standard"
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    generator = Generator(model, tokenizer, args.chunk_size, device, args.gpu_budget)
    with common.records_file(args.out, "w") as write, generator:
        bar = tqdm(samples, desc="RULER", unit="sample", file=sys.stderr)
        for sample in bar:
            bar.set_postfix_str(f"{sample.task} @ {sample.length}")
            metric = TASKS[sample.task].metric
            got = generator.generate(sample.input_ids, sample.max_new_tokens)
            prediction = postprocess_pred(got.text)
            row: dict[str, Any] = {
                "task": sample.task,
                "length": sample.length,
                "index": sample.index,
                "seed": sample.seed,
                "prompt_tokens": sample.num_tokens,
                "max_new_tokens": sample.max_new_tokens,
                "references": sample.references,
                "prediction": prediction,
                "score": sample_score(prediction, sample.references, metric),
                "seconds": round(got.seconds, 3),
            }
            if compare:
                ref = generator.generate(sample.input_ids, sample.max_new_tokens, standard=True)
                ref_prediction = postprocess_pred(ref.text)
                row["standard_prediction"] = ref_prediction
                row["standard_score"] = sample_score(ref_prediction, sample.references, metric)
                row["standard_seconds"] = round(ref.seconds, 3)
                row["identical"] = ref.token_ids == got.token_ids
            rows.append(row)
            write(row)

    title = (
        f"RULER: {args.model}, {len(args.tasks)} task(s) x {len(args.lengths)} length(s) x "
        f"{args.samples} sample(s), seed {args.seed}, {device}, chunk_size {args.chunk_size}, "
        f"{time.perf_counter() - start:.0f} s"
    )
    if not is_main_rank():  # under torchrun every rank runs; rank 0 prints and writes
        return 0
    _print_table(rows, args.lengths, args.tasks, title, compare)
    config = {
        "lengths": args.lengths,
        "tasks": args.tasks,
        "samples": args.samples,
        "seed": args.seed,
    }
    common.report(args, "ruler", device, dtype, config, scores(rows, compare), start, "sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
