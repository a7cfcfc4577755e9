"""``pipeline("headinfer-qa")``: one prefill of the context, many questions, answers exact
against generating each question from scratch (tiny models of every family, and SmolLM2)."""

from __future__ import annotations

import string
from typing import Any

import pytest
import torch
from _tiny import FAMILIES, VOCAB, tiny_model, twin
from transformers import PreTrainedTokenizerFast, pipeline

import headinfer
from headinfer.pipelines import HeadInferQAPipeline

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
QUESTIONS = ["Who keeps the light?", "What colour is the boat?", "Where is the bakery?"]


def char_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    """One token per character over the tiny models' whole vocabulary (0 pad, 1 BOS, 2 EOS,
    3 unknown): every other id decodes to a character of its own, so that an answer's text
    gives back its token ids exactly (``answer_ids``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + " .,?!<>/\n"
    # The rest of the ids: Greek and Cyrillic letters (one character, one token, each).
    extra = [chr(c) for c in range(0x391, 0x3A2)] + [chr(c) for c in range(0x410, 0x450)]
    chars += "".join(extra[: VOCAB - 4 - len(chars)])
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character, newlines too (a "." would leave runs of "\n" as one unknown token).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def context(words: int = 60) -> str:
    g = torch.Generator().manual_seed(3)
    letters = string.ascii_lowercase
    out = []
    for _ in range(words):
        n = int(torch.randint(2, 7, (1,), generator=g))
        out.append("".join(letters[int(i)] for i in torch.randint(0, 26, (n,), generator=g)))
    return " ".join(out) + "."


def prompt_ids(tok: Any, chat: bool, question: str) -> torch.Tensor:
    """The prompt the pipeline documents, built here without it: the chat template's user turn
    (context, a blank line, the question) and the assistant's turn; or BOS, the context, a
    blank line, the question and a newline."""
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"{context()}\n\n{question}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    else:
        text = f"{tok.bos_token}{context()}\n\n{question}\n"
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def from_scratch(model: Any, tok: Any, chat: bool, question: str, n: int) -> list[int]:
    """The token ids ``generate()`` gives for the documented prompt, no cache reuse (special
    ids dropped, as the pipeline's decoding drops them)."""
    ids = prompt_ids(tok, chat, question)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return [i for i in out[0, ids.shape[1] :].tolist() if i not in tok.all_special_ids]


def answer_ids(tok: Any, answer: str) -> list[int]:
    """The token ids of an answer's text (exact with ``char_tokenizer``: one id per character)."""
    return tok(answer, add_special_tokens=False)["input_ids"]


def test_char_tokenizer_gives_back_every_id() -> None:
    tok = char_tokenizer(chat=False)
    ids = [i for i in range(VOCAB) if i not in tok.all_special_ids]
    assert answer_ids(tok, tok.decode(ids, skip_special_tokens=True)) == ids
    assert answer_ids(tok, "a\n\n b") == tok.convert_tokens_to_ids(["a", "\n", "\n", " ", "b"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chat", [False, True])
def test_answers_equal_generating_each_question_from_scratch(family: str, chat: bool) -> None:
    model = tiny_model(family)
    reference = twin(model)  # eager attention, its own DynamicCache per question
    tok = char_tokenizer(chat)
    pipe = pipeline("headinfer-qa", model=model, tokenizer=tok)
    assert isinstance(pipe, HeadInferQAPipeline)
    out = pipe(context(), questions=QUESTIONS, max_new_tokens=6)
    assert set(out) == {"answers"} and len(out["answers"]) == len(QUESTIONS)
    for question, answer in zip(QUESTIONS, out["answers"]):
        assert answer_ids(tok, answer) == from_scratch(reference, tok, chat, question, 6), question
    # An unpatched model is patched for the call only.
    assert not headinfer.is_patched(model) and type(model) is type(reference)
    single = pipe(context(), question=QUESTIONS[1], max_new_tokens=6)
    assert single == {"answer": out["answers"][1]}


def test_prefills_the_context_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=32, block_size=16)
    tok = char_tokenizer(chat=False)
    pipe = pipeline("headinfer-qa", model=model, tokenizer=tok)
    lengths: list[int] = []
    forward = model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(ids.shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    pipe(context(), questions=QUESTIONS, max_new_tokens=3)
    context_len = pipe.preprocess(context(), questions=["x"])["context_ids"].shape[1]
    # The context once; then per question its own tokens and the decode steps, never the context.
    assert lengths.count(context_len) == 1 and lengths[0] == context_len
    assert max(lengths[1:]) < context_len
    # A patched model stays patched, with its settings.
    assert headinfer.is_patched(model) and model._headinfer.chunk_size == 32


def test_bad_arguments() -> None:
    pipe = pipeline("headinfer-qa", model=tiny_model("llama"), tokenizer=char_tokenizer(False))
    with pytest.raises(ValueError, match="not both"):
        pipe(context(), question="a?", questions=["b?"])
    with pytest.raises(ValueError, match="question"):
        pipe(context())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe(context(200), question="a?", max_new_tokens=8)
    with pytest.raises(TypeError, match="questions"):
        pipe(context(), questions="a?")


@pytest.mark.slow
def test_smollm2_answers_equal_from_scratch(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    from headinfer.needle import filler_sentences

    facts = "The lighthouse keeper is called Ada Brown. The boat is painted red."
    sentences = []
    for i, sentence in enumerate(filler_sentences(0)):
        if i == 15:
            sentences.append(facts)
        if i == 30:
            break
        sentences.append(sentence)
    text = " ".join(sentences)
    questions = ["What is the lighthouse keeper called?", "What colour is the boat?"]
    pipe = pipeline("headinfer-qa", model=model, tokenizer=tok)
    out = pipe(text, questions=questions, max_new_tokens=8)
    assert not headinfer.is_patched(model)
    for question, answer in zip(questions, out["answers"]):
        # The documented prompt (the chat template's user turn), built without the pipeline.
        ids = tok.apply_chat_template(
            [{"role": "user", "content": f"{text}\n\n{question}"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.inference_mode():
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )
        assert answer == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Ada" in out["answers"][0]
