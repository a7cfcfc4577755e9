"""The ``headinfer`` command: ``plan`` against the store's real allocation, ``generate`` on
SmolLM2 (in-process and through ``python -m``), ``demo``, and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import FAMILIES, prompt, tiny_model

import headinfer
from headinfer.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns or exits (argparse errors)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def plan_json(
    capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 0
) -> dict[str, Any]:
    assert run(["plan", *argv, "--json"]) == status
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_matches_the_store_and_the_weights(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real prefill of N tokens through a tiny model: `plan --context N` must predict the
    # bytes the store holds and the bytes of the weights, from the config alone.
    n, chunk = 300, 64
    model = tiny_model(family)
    model.config.save_pretrained(tmp_path)
    headinfer.patch(model, chunk_size=chunk, block_size=16)
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        model(prompt(n), logits_to_keep=1, **{headinfer_cache_name(model): cache})
    store = cache.store
    assert cache.get_seq_length() == n

    plan = plan_json(
        capsys,
        ["--model", str(tmp_path), "--context", str(n), "--chunk-size", str(chunk)]
        + ["--dtype", "fp32", "--gpu-budget", "8GiB"],
    )
    assert plan["weight_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    per_token_layer = plan["kv_bytes_per_token_layer"]
    held = [
        (store.seq_len(i) - store.retained_start(i)) * per_token_layer
        for i in range(store.num_layers)
    ]
    assert sum(held) == cache.memory()["used"]
    windows = plan["windows"]
    assert windows == list(store.windows)
    full = sum(h for h, w in zip(held, windows) if w is None)
    # Full-attention layers: exactly N tokens each. Window layers: the planner reserves
    # min(N, window + chunk) tokens (what a layer holds while a chunk attends); the store
    # holds no more than that.
    window_plan = sum(min(n, w + chunk) * per_token_layer for w in windows if w is not None)
    assert plan["kv_total_bytes"] == full + window_plan
    assert full == plan["full_attention_layers"] * n * per_token_layer
    for h, w in zip(held, windows):
        if w is not None:
            assert w * per_token_layer <= h + per_token_layer <= (w + chunk) * per_token_layer
    if family == "llama":
        assert plan["kv_total_bytes"] == cache.memory()["used"]
    # Everything fits an 8 GiB budget: all KV resident, nothing on the host.
    assert plan["prefill"]["kv_host_bytes"] == plan["host_kv_bytes"] == 0
    headinfer.unpatch(model)


def headinfer_cache_name(model: Any) -> str:
    from headinfer.prefill import cache_kwarg_name

    return cache_kwarg_name(model)


def test_plan_text_smollm2(
    smollm2_tokenizer: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["plan", "--model", "smollm2", "--context", "1000000", "--gpu-budget", "24GiB"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "max_position_embeddings (8,192)" in err and "--force" in err

    assert run([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct (llama): 30 layers, 9 q / 3 kv heads of 64" in out
    assert "134.5M parameters" in out and "chunks of 4,096 tokens" in out
    assert "24.00 GiB of GPU memory" in out
    assert "21.46 GiB" in out  # 1M tokens x 30 layers x 2 x 3 x 64 x 2 bytes
    assert ("no GPU here" in out) != torch.cuda.is_available()
    assert "this RAM:" in out and "prefill" in out and "floors" in out


def test_plan_force_and_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_model("llama").config.save_pretrained(tmp_path)  # max_position_embeddings 512
    base = ["--model", str(tmp_path), "--gpu-budget", "2MiB", "--dtype", "bf16"]
    assert run(["plan", *base, "--context", "1000"]) == 2
    assert "longer than" in capsys.readouterr().err
    # 2 MiB hold no weights: the run does not fit (exit status 1), the figures are still there.
    plan = plan_json(capsys, [*base, "--context", "1000", "--force", "--h2d-gbs", "1"], status=1)
    assert plan["fits"] is False
    assert plan["context"] == 1000 and plan["elem_bytes"] == 2
    host = plan["decode"]["kv_host_bytes"]
    assert host > 0 and plan["floors"]["decode_s_per_token"] == host / 1e9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model", "--context", "10"], "unknown model; give 'smollm2'"),
        (["--model", "/no/such/folder", "--context", "10"], "no such file or folder"),
        (["--model", ".", "--context", "10"], "has no config.json"),
        (["--model", "smollm2", "--context", "10", "--gpu-budget", "lots"], "'20GiB'"),
        (["--model", "smollm2", "--context", "10", "--dtype", "int8"], "bf16, fp16 or fp32"),
        (["--model", "smollm2", "--context", "0"], "must be positive"),
    ],
)
def test_plan_errors_say_what_to_do(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.chdir(REPO / "tests")  # a folder without config.json
    assert run(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_plan_unsupported_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path)
    assert run(["plan", "--model", str(tmp_path), "--context", "10"]) == 2
    assert "supported families: llama, mistral, qwen2, gemma2" in capsys.readouterr().err


PROMPT = "What is the capital of France? Answer in one word."
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def reference_answer(smollm2: tuple[Any, Any]) -> str:
    """SmolLM2's greedy answer to PROMPT with standard attention (chat template)."""
    model, tokenizer = smollm2
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids = enc["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_answer(
    reference_answer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    argv = ["generate", "--model", "smollm2", "--prompt-file", str(prompt_file), "--chat"]
    assert run([*argv, "--max-new-tokens", str(NEW_TOKENS), "--chunk-size", "16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == reference_answer.strip()
    assert "Paris" in captured.out
    for figure in ("prefill:", "tokens/s", "decode:", "KV cache:", "in host memory"):
        assert figure in captured.err


def test_generate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "smollm2", "--prompt-file"]
    assert run([*argv, str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert run([*argv, str(empty)]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    question = tmp_path / "question.txt"
    question.write_text(PROMPT)
    assert run(["generate", "--model", "nope", "--prompt-file", str(question)]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_python_dash_m_headinfer_cli(reference_answer: str) -> None:
    # The entry point as a process: stdin prompt, the answer alone on stdout.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "headinfer.cli", "generate", "--model", "smollm2"]
        + ["--prompt-file", "-", "--chat", "--max-new-tokens", str(NEW_TOKENS)],
        input=PROMPT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == reference_answer.strip()
    assert "KV cache:" in done.stderr


def test_python_dash_m_headinfer_plan(tmp_path: Path) -> None:
    tiny_model("qwen2").config.save_pretrained(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "headinfer", "plan", "--model", str(tmp_path)]
        + ["--context", "400", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["family"] == "qwen2"


def test_demo_is_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["demo", "--help"]) == 0
    assert "Needle-in-a-haystack" in capsys.readouterr().out
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "plan" in out and "demo" in out
