"""Issue 9's features on the GPU: the ``headinfer-qa`` pipeline (exact against from scratch,
fully resident and fully streamed), ``with headinfer.patch``, and the warning for
``cache_implementation="offloaded"`` (transformers' own offloaded cache, which needs CUDA).

Each test runs under a watchdog that dumps every thread's stack if it hangs."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest
import torch
from _tiny import FAMILIES, prompt, tiny_model, twin
from test_pipelines import QUESTIONS, char_tokenizer, context
from transformers import pipeline

import headinfer

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

WATCHDOG_S = 300


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["resident", "streamed"])
def test_pipeline_exact_on_cuda(family: str, budget: str, request: pytest.FixtureRequest) -> None:
    if budget == "streamed":
        request.getfixturevalue("kv_on_host")
    model = tiny_model(family).to("cuda")
    reference = twin(model)
    tok = char_tokenizer(chat=True)
    headinfer.patch(model, chunk_size=64, block_size=16)
    pipe = pipeline("headinfer-qa", model=model, tokenizer=tok)
    out = pipe(context(), questions=QUESTIONS, max_new_tokens=6)
    for question, answer in zip(QUESTIONS, out["answers"]):
        inputs = pipe.preprocess(context(), questions=[question], max_new_tokens=6)
        ids = torch.cat([inputs["context_ids"], inputs["question_ids"][0]], dim=1).cuda()
        with torch.no_grad():
            ref = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
            )
        assert answer == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    headinfer.unpatch(model)


def test_with_patch_on_cuda_restores(kv_on_host: None) -> None:
    model = tiny_model("llama").to("cuda")
    ids = prompt(200).cuda()
    with torch.no_grad():
        before = model(ids).logits
        with headinfer.patch(model, chunk_size=64):
            inside = model(ids).logits
        after = model(ids).logits
    assert not headinfer.is_patched(model)
    assert torch.equal(before, after)
    assert (inside - before).abs().max() / before.abs().max() < 1e-4


def test_offloaded_cache_implementation_warns_once() -> None:
    model = headinfer.patch(tiny_model("llama").to("cuda"), chunk_size=64)
    ids = prompt(100).cuda()
    with pytest.warns(UserWarning, match="pass a headinfer.HeadInferCache"):
        a = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="offloaded")
    b = model.generate(ids, max_new_tokens=3, do_sample=False)  # no second warning
    assert torch.equal(a, b)
