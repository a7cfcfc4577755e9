"""What 8-bit KV (``kv_dtype="int8"``) costs SmolLM2-135M: KL divergence and greedy agreement.

The needle-in-a-haystack prompt of the demo (``headinfer.needle``: chat template, generated
everyday prose, a needle and a question), cut to each ``--tokens`` length, is fed in chunks
through SmolLM2-135M-Instruct (float32, CPU) with an exact ``HeadInferCache`` and an int8 one in
lockstep; at every position the next-token distributions are compared
(``headinfer.eval.kv_loss.measure``): the mean, median and largest KL(exact || int8), and the
share of positions whose greedy token is the same. Also printed: the KV bytes per token of each
format, for this model and for the Llama-3-8B shape. README's "8-bit KV cache" quotes its output;
``tests/eval/test_kv_loss.py`` holds the mean KL to 2e-3 in CI.

    python benchmarks/kv_int8_loss.py                       # 4096 tokens
    python benchmarks/kv_int8_loss.py --tokens 2048,4096,8000 \
        --json benchmarks/results/kv_int8_loss.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import transformers

import headinfer
from headinfer.eval.kv_loss import measure
from headinfer.kv_dtype import kv_token_bytes
from headinfer.needle import make_needle_prompt
from headinfer.smollm2 import load_smollm2


def _lengths(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=_lengths, default=[4096], help="prompt lengths (4096)")
    parser.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (512)")
    parser.add_argument("--seed", type=int, default=0, help="the needle prompt's seed (0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    runs = []
    start = time.perf_counter()
    for tokens in args.tokens:
        ids = make_needle_prompt(tokenizer, tokens, depth=0.5, seed=args.seed).input_ids
        loss = measure(model, ids, kv_dtype="int8", chunk_size=args.chunk_size)
        runs.append({"tokens": tokens, **loss.to_dict()})
        print(
            f"{ids.shape[1]:>6} positions: mean KL {loss.mean_kl:.3e}, "
            f"median {loss.median_kl:.3e}, max {loss.max_kl:.3e}; "
            f"greedy tokens equal {loss.greedy_equal}/{loss.positions} "
            f"({100 * loss.greedy_agreement:.2f}%); {loss.seconds:.0f} s",
            flush=True,
        )
    bf16, f32, int8 = (
        layers * kv_token_bytes(kv_heads, head_dim, "bfloat16"),
        layers * kv_token_bytes(kv_heads, head_dim, "float32"),
        layers * kv_token_bytes(kv_heads, head_dim, "float32", "int8"),
    )
    llama_bf16 = 32 * kv_token_bytes(8, 128, "bfloat16")
    llama_int8 = 32 * kv_token_bytes(8, 128, "bfloat16", "int8")
    print(
        f"KV bytes per token: SmolLM2-135M {f32:,} (float32) / {bf16:,} (bfloat16) exact, "
        f"{int8:,} int8 ({100 * int8 / bf16:.1f}% of bfloat16); Llama-3-8B shape {llama_bf16:,} "
        f"bfloat16, {llama_int8:,} int8 ({100 * llama_int8 / llama_bf16:.1f}%)"
    )
    record = {
        "question": "KL(exact || int8) and greedy agreement of SmolLM2-135M's next-token "
        "distributions",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "text": f"headinfer.needle.make_needle_prompt(tokens, depth=0.5, seed={args.seed})",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "headinfer": headinfer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "kv_bytes_per_token": {
            "smollm2_float32": f32,
            "smollm2_bfloat16": bf16,
            "smollm2_int8": int8,
            "llama3_8b_bfloat16": llama_bf16,
            "llama3_8b_int8": llama_int8,
        },
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
