"""Device memory the driver takes for a store's device blocks, by format and block size: 4 GiB
of blocks appended into a CUDA store, against the drop in ``torch.cuda.mem_get_info``'s free
bytes. Run it alone on the GPU (free memory is device-wide).

Usage: python benchmarks/probe_device_blocks.py
"""

from __future__ import annotations

import torch

from headinfer import _core


def main() -> None:
    torch.cuda.init()
    for kv, bs in [(None, 4096), ("int8", 4096), ("int8", 256), (None, 256)]:
        torch.cuda.synchronize()
        free0, _ = torch.cuda.mem_get_info()
        s = _core.KVStore(
            32,
            8,
            128,
            "bfloat16",
            block_size=bs,
            device=0,
            device_budget=4 << 30,
            max_len=1 << 20,
            kv_dtype=kv,
        )
        k = torch.randn(8, 2048, 128, device="cuda", dtype=torch.bfloat16)
        n = 0
        while s.device_bytes_reserved() < (4 << 30) - (64 << 20) and n < 200_000:
            for layer in range(32):
                s.append(layer, k, k)
            n += 2048
        torch.cuda.synchronize()
        free1, _ = torch.cuda.mem_get_info()
        used = free0 - free1 - k.numel() * 2
        print(
            f"kv={kv} block_size={bs}: store says {s.device_bytes_reserved() / 2**30:.3f} GiB "
            f"(host {s.host_bytes_reserved() / 2**30:.2f}), driver took {used / 2**30:.3f} GiB "
            f"-> x{used / s.device_bytes_reserved():.3f}",
            flush=True,
        )
        del s, k
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
