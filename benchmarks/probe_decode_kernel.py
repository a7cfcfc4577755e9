"""How fast is the decode kernel, per byte, where the KV sits on the host and on the device?

One layer of a Llama-3-8B-shaped cache (8 kv heads, 32 q heads, d=128, bf16) at several
lengths; all blocks pinned on the host (read by the kernel over PCIe, zero-copy) or all in
device memory. Prints GB/s of KV read per decode step beside the pinned memcpy bandwidth
measured in the same run, and the per-call overhead of the binding (append + attend of one
token on a short cache). Usage: python benchmarks/probe_decode_kernel.py
"""

from __future__ import annotations

import time

import torch
from _common import cuda_time, h2d_gbs, write_out

from headinfer import _core

HKV, HQ, D = 8, 32, 128


def bench(fn, iters=20):
    return cuda_time(fn, iters)


def main():
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    h2d = h2d_gbs()
    print(f"pinned memcpy H2D: {h2d:.1f} GB/s", flush=True)
    for where in ["host", "device"]:
        for n in [8192, 32768, 131072]:
            bs = 4096
            budget = 0 if where == "host" else 1 << 40
            st = _core.KVStore(
                1, HKV, D, "bfloat16", block_size=bs, device=0, device_budget=budget, max_len=n + bs
            )
            for _ in range(0, n, 8192):
                k = torch.randn(HKV, 8192, D, device="cuda", dtype=torch.bfloat16)
                st.append(0, k, k, stream=stream)
            q = torch.randn(HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            t = bench(lambda st=st, q=q, out=out: st.attend(0, q, out, D**-0.5, stream=stream))
            nbytes = st.bytes_used()
            row = {
                "where": where,
                "tokens": n,
                "ms": round(t * 1e3, 3),
                "GB/s": round(nbytes / t / 1e9, 1),
                "vs_memcpy": round((nbytes / h2d / 1e9) / t, 3) if where == "host" else None,
            }
            rows.append(row)
            print(row, flush=True)
            del st
    # The CPU sharing the host KV: its own rate, and one layer's decode GPU-only vs shared.
    n = 131072
    st = _core.KVStore(
        1, HKV, D, "bfloat16", block_size=4096, device=0, device_budget=0, max_len=n + 4096
    )
    for _ in range(0, n, 8192):
        k = torch.randn(HKV, 8192, D, device="cuda", dtype=torch.bfloat16)
        st.append(0, k, k, stream=stream)
    torch.cuda.synchronize()
    q = torch.randn(HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    st.cpu_share_min_tokens = 0

    def shared_step():
        st.attend(0, q, out, D**-0.5, stream=stream)
        st.finish_step()

    for heads in (2, 4, 6):
        st.cpu_heads = heads
        t_shared = bench(shared_step, iters=5)
        st.cpu_heads = 0
        t_gpu = bench(lambda: st.attend(0, q, out, D**-0.5, stream=stream), iters=5)
        row = {
            "cpu_heads": heads,
            "shared_ms": round(t_shared * 1e3, 2),
            "gpu_only_ms": round(t_gpu * 1e3, 2),
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        print(row, flush=True)
    del st
    # Binding overhead: one token appended and attended on a short device-resident cache.
    st = _core.KVStore(
        1, HKV, D, "bfloat16", block_size=256, device=0, device_budget=1 << 30, max_len=1 << 16
    )
    k = torch.randn(HKV, 1024, D, device="cuda", dtype=torch.bfloat16)
    st.append(0, k, k, stream=stream)
    k1 = torch.randn(1, HKV, 1, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        st.attend(0, q, out, D**-0.5, stream=stream)
    host_attend = (time.perf_counter() - t0) / 2000
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        st.append(0, k1[0], k1[0], stream=stream)
    host_append = (time.perf_counter() - t0) / 2000
    torch.cuda.synchronize()
    sdpa_q = q.view(1, HQ, 1, D)
    kk = torch.randn(1, HKV, 1024, D, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    for _ in range(2000):
        torch.nn.functional.scaled_dot_product_attention(sdpa_q, kk, kk, enable_gqa=True)
    host_sdpa = (time.perf_counter() - t0) / 2000
    torch.cuda.synchronize()
    over = {
        "attend_us": round(host_attend * 1e6, 1),
        "append_us": round(host_append * 1e6, 1),
        "sdpa_call_us": round(host_sdpa * 1e6, 1),
    }
    print("host time per call:", over, flush=True)
    write_out(
        "probe_decode_kernel.json",
        {
            "h2d_gbs": h2d,
            "rows": rows,
            "overhead": over,
            "device": torch.cuda.get_device_name(),
        },
    )


if __name__ == "__main__":
    main()
