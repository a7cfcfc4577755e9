"""Helpers of the several-process tests: run ``_tp_worker.py`` under torchrun and compare each
rank's logits and tokens with one unpatched eager process (tests/test_distributed.py on the CPU,
tests/gpu/test_multi_gpu.py on GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

WORKER = Path(__file__).with_name("_tp_worker.py")


def run_torchrun(nproc: int, out: Path, models: list[Path], env: dict[str, str], timeout: float):
    """Run ``_tp_worker.py`` on ``nproc`` ranks; fail with each rank's output when it fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port, chosen by the rendezvous
        f"--nproc-per-node={nproc}",
        "--tee=3",
        f"--log-dir={out / 'logs'}",
        str(WORKER),
        str(out),
        *map(str, models),
    ]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {timeout} s\n{_rank_logs(out)}\n{exc.stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"torchrun failed (exit {done.returncode})\n{_rank_logs(out)}\n"
            f"--- torchrun stderr ---\n{done.stderr[-4000:]}"
        )


def _rank_logs(out: Path) -> str:
    parts = []
    for log in sorted((out / "logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(out)} ---\n{log.read_text()[-4000:]}")
    return "\n".join(parts) or "(no rank logs)"


def reference(model: torch.nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpatched process: the prompt's logits ``[1, L, vocab]`` and greedy new tokens."""
    from _tp_worker import NEW_TOKENS, PROMPT_LEN, prompt

    ids = prompt(model.config.vocab_size).to(device)
    model = model.to(device)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, out[0, PROMPT_LEN:].cpu()


def check_tensor_parallel(tmp_path: Path, cases: tuple[str, ...], nproc: int, cpu: bool) -> None:
    """Tiny 4 q / 2 kv head models of ``cases`` split over ``nproc`` ranks (gloo on the CPU,
    else nccl, one GPU each): each rank's cache holds its own kv heads, and logits (< 1e-4,
    float32) and greedy tokens equal one unpatched eager process (on GPU 0 unless ``cpu``)."""
    sys.path.insert(0, str(WORKER.parent))
    models, refs = [], {}
    for case in cases:
        model = tiny_model(case)
        path = tmp_path / case
        model.save_pretrained(path)
        models.append(path)
        refs[str(path)] = reference(model, "cpu" if cpu else "cuda:0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cpu:
        env["HEADINFER_TP_CPU"] = "1"
    # No NVLink multicast: on shared hosts it can take the GPUs out of service.
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    run_torchrun(nproc, tmp_path, models, env, timeout=240)
    heads = 2 // nproc
    for rank in range(nproc):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for path, (logits, tokens) in refs.items():
            got = results[path]
            assert (got["q_heads"], got["kv_heads"], got["tp_size"]) == (4 // nproc, heads, nproc)
            device = "cpu" if cpu else f"cuda:{rank}"
            assert got["stores"] == [(device, heads, 3)], (path, got["stores"])
            err = (got["logits"] - logits).abs().max().item()
            assert err < 1e-4, (path, rank, err)
            assert torch.equal(got["tokens"], tokens), (path, rank, got["tokens"], tokens)
