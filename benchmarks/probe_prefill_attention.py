"""Which exact attention kernel should a prefill chunk use? (DESIGN.md: measure, then choose.)

A prefill chunk of C queries at offset P attends to P + C keys, causal bottom-right, GQA.
Variants, timed with CUDA events on one GPU (bf16, Llama-3-8B heads: 32 q / 8 kv, d=128):
  square   SDPA is_causal on a C x C problem (the rate chunked standard prefill gets)
  lr_gqa   SDPA with attn_mask=causal_lower_right(C, P+C), enable_gqa=True
  two_part past keys unmasked + chunk keys causal, merged by log-sum-exp
           (aten flash op with logsumexp), GQA by folding the group into the query axis
  flex     flex_attention with a lower-right causal block mask, enable_gqa
Prints TFLOP/s (causal FLOPs: 4 * Hq * d * C * (P + C/2)) and the max error against a
float32 math reference on a small case. Usage: python benchmarks/probe_prefill_attention.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from _common import write_out

HQ, HKV, D = 32, 8, 128


def flops(c: int, p: int) -> float:
    return 4.0 * HQ * D * c * (p + c / 2)


def bench(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def lr_gqa(q, k, v):
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def two_part(q, k, v):
    """q [1, HQ, C, D]; k, v [1, HKV, P + C, D]."""
    c, s = q.shape[-2], k.shape[-2]
    p = s - c
    g = HQ // HKV
    scale = D**-0.5
    # Past: every query sees every past key; fold the group into the query axis.
    qf = q.view(1, HKV, g * c, D)
    out_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention(
        qf, k[:, :, :p], v[:, :, :p], 0.0, False, False, scale=scale
    )[:2]
    out_p = out_p.view(1, HQ, c, D)
    lse_p = lse_p.view(1, HQ, c)
    kc = k[:, :, p:].repeat_interleave(g, 1)
    vc = v[:, :, p:].repeat_interleave(g, 1)
    out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention(
        q, kc, vc, 0.0, True, False, scale=scale
    )[:2]
    m = torch.maximum(lse_p, lse_c)
    wp = torch.exp(lse_p - m).unsqueeze(-1)
    wc = torch.exp(lse_c - m).unsqueeze(-1)
    return (out_p.float() * wp + out_c.float() * wc).div_(wp + wc).to(q.dtype)


def two_part_cudnn(q, k, v):
    """As two_part, with cuDNN's fused attention (which returns the log-sum-exp too)."""
    c, s = q.shape[-2], k.shape[-2]
    p = s - c
    g = HQ // HKV
    scale = D**-0.5
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    qf = q.view(1, HKV, g * c, D)
    out_p, lse_p = cudnn(qf, k[:, :, :p], v[:, :, :p], None, True, 0.0, False, False, scale=scale)[
        :2
    ]
    out_p = out_p.view(1, HQ, c, D)
    lse_p = lse_p.reshape(1, HQ, c)
    kc = k[:, :, p:].repeat_interleave(g, 1)
    vc = v[:, :, p:].repeat_interleave(g, 1)
    out_c, lse_c = cudnn(q, kc, vc, None, True, 0.0, True, False, scale=scale)[:2]
    lse_c = lse_c.reshape(1, HQ, c)
    m = torch.maximum(lse_p, lse_c)
    wp = torch.exp(lse_p - m).unsqueeze(-1)
    wc = torch.exp(lse_c - m).unsqueeze(-1)
    return (out_p.float() * wp + out_c.float() * wc).div_(wp + wc).to(q.dtype)


def rect_only(q, k, v):
    """Rate bound: the past part alone through public SDPA (no mask, group folded)."""
    c, s = q.shape[-2], k.shape[-2]
    g = HQ // HKV
    qf = q.view(1, HKV, g * c, D)
    return F.scaled_dot_product_attention(qf, k[:, :, : s - c], v[:, :, : s - c])


_flex = None


def flex(q, k, v):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    c, s = q.shape[-2], k.shape[-2]
    off = s - c

    def causal(b, h, qi, kv):
        return kv <= qi + off

    bm = create_block_mask(causal, 1, 1, c, s, device=q.device)
    return _flex(q, k, v, block_mask=bm, enable_gqa=True)


def reference(q, k, v):
    g = HQ // HKV
    c, s = q.shape[-2], k.shape[-2]
    kk = k.float().repeat_interleave(g, 1)
    vv = v.float().repeat_interleave(g, 1)
    sc = q.float() @ kk.transpose(-1, -2) * D**-0.5
    i = torch.arange(c, device=q.device)[:, None] + (s - c)
    j = torch.arange(s, device=q.device)[None]
    sc = sc.masked_fill(j > i, float("-inf"))
    return sc.softmax(-1) @ vv


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    variants = {
        "lr_gqa": lr_gqa,
        "two_part": two_part,
        "two_part_cudnn": two_part_cudnn,
        "rect_only": rect_only,
        "flex": flex,
    }
    if os.environ.get("PROBE_NO_FLEX"):
        del variants["flex"]
    rows = []
    # Correctness on a small case.
    q = torch.randn(1, HQ, 256, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, 1280, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, 1280, D, device=dev, dtype=torch.bfloat16)
    ref = reference(q, k, v)
    errs = {}
    for name, fn in variants.items():
        if name == "rect_only":
            continue
        try:
            errs[name] = (fn(q, k, v).float() - ref).abs().max().item()
        except Exception as e:  # noqa: BLE001 - a probe reports every failure
            errs[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print("max abs error vs fp32 reference:", errs, flush=True)
    for c, p in [(8192, 24576), (8192, 122880), (4096, 126976), (16384, 114688)]:
        q = torch.randn(1, HQ, c, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, p + c, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, p + c, D, device=dev, dtype=torch.bfloat16)
        row = {"C": c, "P": p}
        qs = q
        ks = k[:, :, p:].repeat_interleave(HQ // HKV, 1)
        vs = v[:, :, p:].repeat_interleave(HQ // HKV, 1)
        t = bench(
            lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        )
        row["square_tflops"] = round(flops(c, 0) / t / 1e12, 1)
        for name, fn in variants.items():
            if isinstance(errs.get(name), str):
                continue
            try:
                t = bench(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v))
                row[name + "_tflops"] = round(flops(c, p) / t / 1e12, 1)
            except Exception as e:  # noqa: BLE001
                row[name + "_tflops"] = f"{type(e).__name__}"
        rows.append(row)
        print(row, flush=True)
        del q, k, v, ks, vs
        torch.cuda.empty_cache()
    write_out(
        "probe_prefill_attention.json",
        {"errors": errs, "rows": rows, "device": torch.cuda.get_device_name()},
    )
    print(torch.cuda.get_device_name(), torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
