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
    """One token per character, ids below the tiny models' vocabulary (0 pad, 1 BOS, 2 EOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + " .,?!<>/\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
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


def from_scratch(model: Any, tok: Any, pipe: HeadInferQAPipeline, question: str, n: int) -> str:
    """The answer ``generate()`` gives for the pipeline's own prompt tokens, no cache reuse."""
    inputs = pipe.preprocess(context(), questions=[question], max_new_tokens=n)
    ids = torch.cat([inputs["context_ids"], inputs["question_ids"][0]], dim=1)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


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
        assert answer == from_scratch(reference, tok, pipe, question, 6), question
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
        inputs = pipe.preprocess(text, questions=[question], max_new_tokens=8)
        ids = torch.cat([inputs["context_ids"], inputs["question_ids"][0]], dim=1)
        with torch.inference_mode():
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )
        assert answer == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Ada" in out["answers"][0]
