"""The real SmolLM2-135M on a ~7K-token needle-in-a-haystack prompt: headinfer against standard
attention, same model, same dtype (float32), greedy decoding."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
import torch

import headinfer
from headinfer.needle import make_needle_prompt, needle_found

pytestmark = pytest.mark.slow

NEW_TOKENS = 24


def _generate(model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    with torch.inference_mode():
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            # Past the answer's end-of-turn token too: 24 tokens to compare, not 8.
            min_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def _cache_kwarg(model: Any) -> str:
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_needle_7k_identical_to_standard_attention(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    prompt = make_needle_prompt(tokenizer, 7000, depth=0.5, seed=0)
    ids = prompt.input_ids
    assert 6900 <= prompt.num_tokens <= 7000
    assert prompt.num_tokens + NEW_TOKENS <= model.config.max_position_embeddings

    reference = _generate(model, ids)

    headinfer.patch(model, chunk_size=2048)
    try:
        cache = headinfer.HeadInferCache(model)
        out = _generate(model, ids, **{_cache_kwarg(model): cache})
    finally:
        headinfer.unpatch(model)

    new = out.sequences[0, ids.shape[1] :]
    ref_new = reference.sequences[0, ids.shape[1] :]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert new.tolist() == ref_new.tolist(), (
        f"headinfer: {answer!r}\nstandard:  {tokenizer.decode(ref_new, skip_special_tokens=True)!r}"
    )
    assert needle_found(answer, prompt.needle), answer
    # Exact up to summation order: every step's logits, not only their argmax.
    for step, (mine, theirs) in enumerate(zip(out.logits, reference.logits)):
        torch.testing.assert_close(mine, theirs, atol=2e-3, rtol=1e-3, msg=f"step {step}")

    # Every token but the last generated one is in the host store, f32: 2 x layers x kv heads
    # x head_dim x 4 bytes each.
    config = model.config
    seq = prompt.num_tokens + NEW_TOKENS - 1
    assert cache.get_seq_length() == seq
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    assert cache.bytes_used() == seq * per_token
    assert cache.bytes_reserved() >= cache.bytes_used()


def test_capital_of_france(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    headinfer.patch(model, chunk_size=8)  # several prefill chunks even for a short prompt
    try:
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
            )
    finally:
        headinfer.unpatch(model)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from headinfer import demo

    assert demo.main(["--tokens", "800", "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "found:    yes" in printed
    assert "identical tokens: yes" in printed
    assert "KV cache:" in printed


def test_quickstart_example(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    runpy.run_path(str(root / "examples" / "01_quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "What is the secret number? -> '66226.' (expected 66226)" in printed
