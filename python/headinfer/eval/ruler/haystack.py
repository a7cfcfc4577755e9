"""What the haystacks are made of, generated (nothing is downloaded): a fixed word list (RULER
draws from wonderwords' nouns, adjectives and verbs), pronounceable words beyond it, and
essay-like prose (RULER uses Paul Graham's essays)."""

from __future__ import annotations

import random
import re

__all__ = ["KEY_WORDS", "WORDS", "essay_words", "split_sentences", "word_pool"]


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


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
