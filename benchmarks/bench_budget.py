"""Is ``gpu_budget`` a true bound? The process's device memory, by NVML, during ``generate()``.

A Llama-3-8B-shaped model (random bf16 weights); for each explicit budget and context, one
``generate()`` through a patched model while a thread polls NVML every 5 ms. The process's use
is read two ways: NVML's per-process figure (where the container's process ids match) and the
device-wide use over what was in use before this script touched CUDA (the ballast of
``shared/peers/card.py`` included in that baseline). Run it under card.py to emulate a card:

    python card.py --gib 24 --json $OUT/card.json -- \
        python benchmarks/bench_budget.py --budgets 18,20,24 --contexts 32768,131072

Writes $OUT/bench_budget.json (or ./bench_budget.json). A run whose budget cannot hold the
model's working set must end in ``OutOfDeviceMemoryError`` before prefill, and is recorded so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time

import pynvml

GIB = 1 << 30


class Poller:
    """Peak device memory of this process on one GPU, polled every 5 ms."""

    def __init__(self, index: int = 0) -> None:
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        # Read before this process creates its CUDA context: what others hold.
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.pid = os.getpid()
        self.device_peak = 0
        self.proc_peak = 0
        self._run = False

    def _poll(self) -> None:
        while self._run:
            used = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.base
            self.device_peak = max(self.device_peak, used)
            try:
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.proc_peak = max(self.proc_peak, p.usedGpuMemory)
            except pynvml.NVMLError:
                pass
            time.sleep(0.005)

    def __enter__(self) -> Poller:
        self.device_peak = self.proc_peak = 0
        self._run = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run = False
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="18,20,24", help="GiB, comma-separated")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=4096)
    args = ap.parse_args()
    poller = Poller(0)

    import torch
    from _common import llama8b

    import headinfer

    cfg, model = llama8b()
    torch.cuda.synchronize()
    loaded = pynvml.nvmlDeviceGetMemoryInfo(poller.handle).used - poller.base
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "free_at_start_gib": round(torch.cuda.mem_get_info()[0] / GIB, 2),
        "model_loaded_gib_nvml": round(loaded / GIB, 2),
        "weights_gib_torch": round(torch.cuda.memory_allocated() / GIB, 2),
        "runs": [],
    }
    print(json.dumps(results), flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for s in [int(c) for c in args.contexts.split(",")]:
            headinfer.patch(model, chunk_size=args.chunk_size, gpu_budget=f"{budget}GiB")
            ids = torch.randint(0, cfg.vocab_size, (1, s), device="cuda")
            r: dict = {"budget_gib": budget, "context": s}
            t = time.time()
            try:
                with poller, torch.inference_mode():
                    out = model.generate(
                        ids, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=1
                    )
                    torch.cuda.synchronize()
                r["generated"] = int(out.shape[1] - s)
            except headinfer.OutOfDeviceMemoryError as exc:
                r["refused"] = str(exc)
            except torch.OutOfMemoryError as exc:
                r["torch_oom"] = str(exc).splitlines()[0]
            r["seconds"] = round(time.time() - t, 1)
            r["peak_gib_device_wide"] = round(poller.device_peak / GIB, 3)
            r["peak_gib_per_process"] = round(poller.proc_peak / GIB, 3)
            r["within_budget"] = max(poller.device_peak, poller.proc_peak) <= budget * GIB
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            del ids
            out = None
            gc.collect()
            torch.cuda.empty_cache()
            headinfer.unpatch(model)
            torch.cuda.set_per_process_memory_fraction(1.0)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "bench_budget.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
