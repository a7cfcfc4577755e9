"""Quickstart: a long prompt through a headinfer-patched model, on the CPU.

Needs the ``demo`` extra (``pip install ".[demo]"`` in a checkout, or ``make build``); the
model's weights are fetched once on first use (README, Install). Run:
``python examples/01_quickstart.py``.
"""

from __future__ import annotations

import logging

import torch

import headinfer
from headinfer.needle import make_needle_prompt
from headinfer.smollm2 import load_smollm2


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    # Any Llama, Mistral, Qwen2 or Gemma-2 transformers model works the same way.
    model, tokenizer = load_smollm2(dtype=torch.float32)
    headinfer.patch(model, chunk_size=2048)  # KV cache in host memory, chunked prefill

    # A ~4K-token prompt: a secret number hidden in filler text, and a question about it.
    prompt = make_needle_prompt(tokenizer, num_tokens=4000)
    inputs = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)

    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"{prompt.question} -> {answer.strip()!r} (expected {prompt.needle})")

    headinfer.unpatch(model)  # back to the model's own attention and cache


if __name__ == "__main__":
    main()
