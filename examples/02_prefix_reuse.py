"""Prefix reuse: prefill a long document once, then ask it several questions.

The document's keys and values stay in one ``headinfer.HeadInferCache``. Each question is
appended after the document, answered, and then ``cache.crop(doc_len)`` drops the question
and the answer, so the next question starts from the document again without prefilling it a
second time. The answers are the same tokens a fresh prefill of document + question gives.

Needs the ``demo`` extra (``pip install ".[demo]"`` in a checkout, or ``make build``); the
model's weights are fetched once on first use (README, Install). Run:
``python examples/02_prefix_reuse.py`` (about 15 s on two CPU cores). The
``pipeline("headinfer-qa")`` that headinfer registers does the same in one call.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

import headinfer
from headinfer.needle import filler_sentences
from headinfer.smollm2 import load_smollm2

#: Facts hidden in the document, and the question that asks for each.
FACTS = (
    ("The name of the lighthouse keeper is Ada Brown.", "What is the lighthouse keeper's name?"),
    ("The harbour master has a red parrot named Captain.", "What is the parrot's name?"),
    ("The bakery on the hill sells olive bread.", "What does the bakery on the hill sell?"),
)


def build_document(tokenizer: Any, num_tokens: int = 1500, seed: int = 0) -> str:
    """About ``num_tokens`` tokens of everyday filler with the ``FACTS`` spread through it."""
    sentences: list[str] = []
    total = 0
    for sentence in filler_sentences(seed):
        total += len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if total > num_tokens:
            break
        sentences.append(sentence)
    for i, (fact, _question) in enumerate(FACTS):
        sentences.insert((2 * i + 1) * len(sentences) // (2 * len(FACTS)), fact)
    return " ".join(sentences)


def split_prompt(tokenizer: Any, document: str, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The chat prompt for ``question`` about ``document``, as ``(doc_ids, question_ids)``.

    ``doc_ids`` (``[1, D]``) is everything up to the end of the document: the same tokens for
    every question, so it is what the cache keeps. ``question_ids`` (``[1, Q]``) is the rest:
    the question, the end of the user turn and the start of the assistant's.
    """
    messages = [{"role": "user", "content": f"{document}\n\nQuestion: {question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cut = text.index(document) + len(document)

    def ids(part: str) -> torch.Tensor:
        return tokenizer(part, return_tensors="pt", add_special_tokens=False)["input_ids"]

    return ids(text[:cut]), ids(text[cut:])


def cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """``cache=`` on transformers >= 5.24, ``past_key_values=`` before."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def prefill(model: Any, cache: headinfer.HeadInferCache, doc_ids: torch.Tensor) -> int:
    """Run the document through ``model`` into ``cache``; returns its length in tokens."""
    with torch.inference_mode():
        model(doc_ids, logits_to_keep=1, **cache_kwarg(model, cache))
    return cache.get_seq_length()


def answer(model: Any, ids: torch.Tensor, max_new_tokens: int, cache: Any = None) -> torch.Tensor:
    """Greedy answer to the full prompt ``ids`` (``[1, L]``); with ``cache``, only the tokens
    it does not hold yet are prefilled. Returns the new token ids (``[N]``)."""
    kwargs = {} if cache is None else cache_kwarg(model, cache)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return out[0, ids.shape[1] :]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    model, tokenizer = load_smollm2(dtype=torch.float32)
    headinfer.patch(model, chunk_size=1024)

    document = build_document(tokenizer, num_tokens=1500)
    doc_ids, _ = split_prompt(tokenizer, document, FACTS[0][1])

    cache = headinfer.HeadInferCache(model)
    start = time.perf_counter()
    doc_len = prefill(model, cache, doc_ids)
    print(f"document: {doc_len} tokens prefilled once in {time.perf_counter() - start:.1f} s")

    for _fact, question in FACTS:
        prefix, question_ids = split_prompt(tokenizer, document, question)
        assert torch.equal(prefix, doc_ids)  # the same document tokens every time
        start = time.perf_counter()
        new = answer(model, torch.cat([doc_ids, question_ids], 1), 24, cache=cache)
        took = time.perf_counter() - start
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        print(f"{question} -> {text!r} ({took:.1f} s, {question_ids.shape[1]} new prompt tokens)")
        cache.crop(doc_len)  # back to the document alone, for the next question

    mem = cache.memory()
    print(f"KV cache: {mem['used'] / 2**20:.1f} MiB for the {doc_len}-token document")
    headinfer.unpatch(model)


if __name__ == "__main__":
    main()
