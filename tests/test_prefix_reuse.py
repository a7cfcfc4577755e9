"""Prefix reuse on SmolLM2 (examples/02_prefix_reuse.py's workflow): a document prefilled once
into a ``HeadInferCache``, then several questions, ``crop(doc_len)`` after each answer. Each
answer must be the tokens a fresh prefill of document + question gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import headinfer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "02_prefix_reuse.py"
NEW_TOKENS = 6


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prefix_reuse_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reused_prefix_answers_like_a_fresh_prefill(smollm2: tuple[Any, Any]) -> None:
    ex = _example()
    model, tokenizer = smollm2
    document = ex.build_document(tokenizer, num_tokens=400)
    questions = [question for _fact, question in ex.FACTS]
    try:
        headinfer.patch(model, chunk_size=256)
        doc_ids, _ = ex.split_prompt(tokenizer, document, questions[0])
        cache = headinfer.HeadInferCache(model)
        doc_len = ex.prefill(model, cache, doc_ids)
        assert doc_len == doc_ids.shape[1] > 300
        used = cache.memory()["used"]

        reused, fresh = [], []
        for question in questions:
            prefix, question_ids = ex.split_prompt(tokenizer, document, question)
            assert torch.equal(prefix, doc_ids)
            ids = torch.cat([doc_ids, question_ids], 1)
            reused.append(ex.answer(model, ids, NEW_TOKENS, cache=cache))
            assert cache.get_seq_length() > doc_len
            cache.crop(doc_len)
            assert cache.get_seq_length() == doc_len
            assert cache.memory()["used"] == used
            fresh.append(ex.answer(model, ids, NEW_TOKENS))  # its own cache, from scratch
    finally:
        headinfer.unpatch(model)

    assert not headinfer.is_patched(model)
    for question, got, want in zip(questions, reused, fresh):
        assert torch.equal(got, want), (
            question,
            tokenizer.decode(got),
            tokenizer.decode(want),
        )
    # The questions differ, and so do (some of) the answers: the cache really was cropped.
    assert len({tuple(a.tolist()) for a in reused}) > 1
