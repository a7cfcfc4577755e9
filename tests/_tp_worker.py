"""One rank of the tensor-parallel test (tests/test_distributed.py), run by ``torchrun``.

Usage: ``torchrun --standalone --nproc-per-node N tests/_tp_worker.py OUT MODEL_DIR...``.
Each model is loaded with transformers' ``tp_plan="auto"`` (gloo on the CPU, nccl on GPUs),
patched with headinfer, prefilled in chunks and decoded greedily; each rank saves what it got to
``OUT/rank{r}.pt``: per model, the prompt's logits, the generated tokens, and the heads its cache
held.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import headinfer

PROMPT_LEN = 300
CHUNK = 64
NEW_TOKENS = 8


def prompt(vocab: int) -> torch.Tensor:
    """The prompt every rank and the one-process reference run: ``[1, PROMPT_LEN]``."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (1, PROMPT_LEN), generator=g)


def run(path: str, device: torch.device) -> dict[str, object]:
    model = AutoModelForCausalLM.from_pretrained(
        path,
        distributed_config=DistributedConfig(tp_plan="auto"),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    headinfer.patch(model, chunk_size=CHUNK, progress=False)
    spec = model._headinfer.spec
    ids = prompt(model.config.vocab_size).to(device)
    with torch.no_grad():
        cache = headinfer.HeadInferCache(model)
        kw = {model._headinfer.cache_name: cache}
        logits = model(ids, use_cache=True, **kw).logits
        stores = [(str(p.device), p.store.num_kv_heads, p.store.num_layers) for p in cache.stores]
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "logits": logits.float().cpu(),
        "tokens": out[0, PROMPT_LEN:].cpu(),
        "kv_heads": spec.num_kv_heads,
        "q_heads": spec.num_q_heads,
        "tp_size": spec.tp_size,
        "stores": stores,
    }


def main() -> None:
    out_dir, paths = sys.argv[1], sys.argv[2:]
    cuda = torch.cuda.is_available() and os.environ.get("HEADINFER_TP_CPU") != "1"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        results = {path: run(path, device) for path in paths}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
