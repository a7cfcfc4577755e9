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


def test_int8_plan_matches_the_int8_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 300
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    headinfer.patch(model, chunk_size=64, block_size=16, kv_dtype="int8")
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        model(prompt(n), logits_to_keep=1, **{headinfer_cache_name(model): cache})
    argv = ["--model", str(tmp_path), "--context", str(n), "--chunk-size", "64"]
    argv += ["--dtype", "fp32", "--gpu-budget", "8GiB"]
    plan = plan_json(capsys, [*argv, "--kv-dtype", "int8"])
    assert plan["kv_dtype"] == "int8"
    assert plan["kv_total_bytes"] == cache.memory()["used"] == cache.bytes_used()
    exact = plan_json(capsys, argv)
    assert exact["kv_dtype"] == "exact" and exact["kv_total_bytes"] > plan["kv_total_bytes"]
    assert exact["weight_bytes"] == plan["weight_bytes"]


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
    assert "supported families: llama, mistral, mixtral" in capsys.readouterr().err


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- plan: suffixes, exit status, longest context, plot ----------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("131072", 131072), ("128K", 131072), ("128k", 131072), ("1M", 1 << 20)]
    + [("1.5M", 3 << 19), ("1,000,000", 1000000), ("1_000", 1000)],
)
def test_context_suffixes(text: str, tokens: int) -> None:
    from headinfer.sizes import parse_context

    assert parse_context(text) == tokens


def test_plan_takes_suffixes_and_rejects_nonsense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_model("llama").config.save_pretrained(tmp_path)
    base = ["--model", str(tmp_path), "--gpu-budget", "8GiB", "--force"]
    assert plan_json(capsys, [*base, "--context", "128K"])["context"] == 131072
    assert plan_json(capsys, [*base, "--context", "1K", "--chunk-size", "512"])["context"] == 1024
    assert run(["plan", *base, "--context", "12Q"]) == 2
    assert "128K or 1M" in capsys.readouterr().err


def _fixed_ram(monkeypatch: pytest.MonkeyPatch, num_bytes: int) -> None:
    from headinfer import plan as plan_module

    monkeypatch.setattr(plan_module, "_mem_available", lambda: num_bytes)


def _tiny_llama_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A tiny Llama's config saved in ``tmp_path``, this host's RAM fixed at 64 MiB, and no GPU
    seen (on a machine with one, its free memory would also decide the verdicts: the plan
    command then reads this host as one without, so these tests run everywhere)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_model("llama").config
    config.save_pretrained(tmp_path)
    _fixed_ram(monkeypatch, 64 << 20)
    return config


def test_plan_exit_status_and_longest_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from headinfer.plan import make_plan

    config = _tiny_llama_folder(tmp_path, monkeypatch)
    base = ["--model", str(tmp_path), "--force", "--chunk-size", "64"]
    # Weights, working set, margin and the CUDA context's estimate, and 128 MiB for KV and staging.
    fixed = make_plan(config, context=300, gpu_budget=1 << 40, chunk_size=64, dtype="bfloat16")
    budget_bytes = fixed["prefill"]["gpu_bytes"] - fixed["prefill"]["kv_device_bytes"] + (128 << 20)
    budget = ["--gpu-budget", str(budget_bytes)]

    plan = plan_json(capsys, [*base, *budget, "--context", "300"])
    assert plan["fits"] is True
    longest = plan["longest_context"]
    assert longest["host_bytes"] == 64 << 20
    n, resident = longest["with_host"], longest["resident"]
    assert 300 < resident < n

    def host(context: int) -> int:
        figures = make_plan(
            config, context=context, gpu_budget=budget_bytes, chunk_size=64, dtype="bfloat16"
        )
        return figures["host_kv_bytes"]

    # The longest context fits the RAM; one token more does not. Resident: no host KV.
    assert host(n) <= 64 << 20 < host(n + 1)
    assert host(resident) == 0 < host(resident + 1)

    # One token beyond it: does not fit this host's RAM, exit status 1, and says so.
    assert run(["plan", *base, *budget, "--context", str(n + 1)]) == 1
    out = capsys.readouterr().out
    assert "fits NO" in out and "overall: does NOT fit (exit status 1)" in out
    assert f"longest context: {n:,} tokens" in out
    # A budget that does not hold the weights: exit status 1.
    assert run(["plan", *base, "--gpu-budget", "2MiB", "--context", "10"]) == 1
    assert "longest context: none" in capsys.readouterr().out


def test_plan_longest_context_for_each_kv_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_llama_folder(tmp_path, monkeypatch)
    base = ["--model", str(tmp_path), "--force", "--chunk-size", "64", "--context", "300"]
    base += ["--gpu-budget", "4GiB"]
    plan = plan_json(capsys, base)
    longest = plan["longest_context"]
    by = longest["by_kv_dtype"]
    assert list(by) == ["exact", "int8"] and longest["kv_dtype"] == "exact"
    assert by["exact"] == {"with_host": longest["with_host"], "resident": longest["resident"]}
    assert by["int8"]["with_host"] > by["exact"]["with_host"]
    assert by["int8"]["resident"] > by["exact"]["resident"]
    assert run(["plan", *base]) == 0
    out = capsys.readouterr().out
    assert f"longest context: {longest['with_host']:,} tokens" in out
    for kv_dtype, figures in by.items():
        row = f"  {kv_dtype:<12}{figures['with_host']:>20,}{figures['resident']:>22,}"
        assert row in out, out
    # --kv-dtype int8: the plan's own figures in int8, the same table.
    int8 = plan_json(capsys, [*base, "--kv-dtype", "int8"])
    assert int8["kv_dtype"] == "int8"
    assert int8["kv_bytes_per_token_layer"] < plan["kv_bytes_per_token_layer"]
    assert int8["longest_context"]["with_host"] == by["int8"]["with_host"]
    assert int8["longest_context"]["by_kv_dtype"] == by
    assert run(["plan", *base, "--kv-dtype", "fp8"]) == 2
    assert "--kv-dtype: invalid choice: 'fp8'" in capsys.readouterr().err


def test_plan_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    tiny_model("gemma2").config.save_pretrained(tmp_path)
    _fixed_ram(monkeypatch, 1 << 30)
    png = tmp_path / "plan.png"
    argv = ["plan", "--model", str(tmp_path), "--context", "400", "--gpu-budget", "2GiB"]
    assert run([*argv, "--plot", str(png)]) in (0, 1)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "plot:" in capsys.readouterr().err
    assert run([*argv, "--plot", str(tmp_path / "no" / "such" / "dir.png")]) == 2


# --- devices, version, prompt and sampling --------------------------------------------------


def test_device_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "smollm2", "--prompt", "hi", "--device"]
    assert run([*argv, "mps"]) == 2
    err = capsys.readouterr().err
    assert "headinfer runs on the CPU or a CUDA GPU, not 'mps'" in err
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        assert run([*argv, "cuda"]) == 2
        err = capsys.readouterr().err
        assert "torch sees no CUDA GPU" in err and "--device cpu" in err
    assert run([*argv, "toaster"]) == 2
    assert "expected auto, cpu or cuda" in capsys.readouterr().err
    assert run(["eval", "ruler", "--device", "mps"]) == 2
    assert "not 'mps'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"headinfer {headinfer.__version__} (transformers ")


def test_hub_id_not_downloaded_names_hf_download(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run(["plan", "--model", "no-such-org/no-such-model-x", "--context", "10"]) == 2
    err = capsys.readouterr().err
    assert "hf download no-such-org/no-such-model-x" in err and "huggingface-cli" not in err


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A tiny Llama with a one-character-per-token tokenizer and a chat template."""
    from test_pipelines import char_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer(chat=True).save_pretrained(folder)
    return folder


def _answer(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert run(["generate", "--device", "cpu", "--max-new-tokens", "6", *argv]) == 0
    return capsys.readouterr().out


def test_generate_prompt_text_and_sampling(
    tiny_folder: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = ["--model", str(tiny_folder)]
    greedy = _answer(capsys, [*model, "--prompt", "hello there"])
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("hello there")
    assert _answer(capsys, [*model, "--prompt-file", str(prompt_file)]) == greedy
    sampled = [
        _answer(capsys, [*model, "--prompt", "hello there", "--temperature", "5", "--seed", "3"])
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # the seed decides
    others = {
        _answer(capsys, [*model, "--prompt", "hello there", "--temperature", "5", "--seed", str(s)])
        for s in range(4, 9)
    }
    assert len(others | {greedy}) > 1  # sampling does sample
    topk = _answer(capsys, [*model, "--prompt", "hello there", "--top-k", "1", "--seed", "1"])
    assert topk == greedy  # top-1 sampling is greedy
    assert run(["generate", *model, "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err
    assert run(["generate", *model, "--prompt", "x", "--prompt-file", "f"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_generate_kv_dtype(
    tiny_folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["generate", "--model", str(tiny_folder), "--device", "cpu", "--prompt", "hello"]
    assert run([*argv, "--max-new-tokens", "6", "--kv-dtype", "int8"]) == 0
    err = capsys.readouterr().err
    assert "KV cache (int8):" in err
    assert run([*argv, "--kv-dtype", "fp8"]) == 2
    assert "--kv-dtype: invalid choice: 'fp8'" in capsys.readouterr().err

    # A store that refuses the KV dtype (as CUDA stores did before their int8 kernels): a
    # one-line error naming the option.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("kv_dtype: int8 KV blocks are not supported on this device")

    monkeypatch.setattr(headinfer, "HeadInferCache", refuse)
    assert run([*argv, "--kv-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "error: --kv-dtype int8: kv_dtype: int8 KV blocks are not supported on" in err


def test_generate_chat_strips_the_prompt_files_newline(
    tiny_folder: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import PreTrainedTokenizerFast

    contents: list[str] = []
    original = PreTrainedTokenizerFast.apply_chat_template

    def spy(self: Any, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        contents.append(conversation[-1]["content"])
        return original(self, conversation, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "apply_chat_template", spy)
    prompt_file = tmp_path / "question.txt"
    prompt_file.write_text("What is it?\n")
    model = ["--model", str(tiny_folder), "--chat"]
    from_file = _answer(capsys, [*model, "--prompt-file", str(prompt_file)])
    assert contents == ["What is it?"]
    assert _answer(capsys, [*model, "--prompt", "What is it?"]) == from_file


def test_eval_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["eval"]) == 2
    assert "ruler" in capsys.readouterr().out
    assert run(["eval", "ruler", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: headinfer eval ruler") and "--gpu-budget" in out
    assert run(["eval", "longbench", "--help"]) == 0
    assert "JSON lines" in capsys.readouterr().out
    assert run(["eval", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert run(["--help"]) == 0
    assert "eval" in capsys.readouterr().out


# --- plan --gpus: the per-GPU split ------------------------------------------------------------


def test_plan_gpus_split_heads_and_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _tiny_llama_folder(tmp_path, monkeypatch)  # 3 layers, 4 q / 2 kv heads
    base = ["--model", str(tmp_path), "--force", "--chunk-size", "64", "--context", "5000"]
    base += ["--gpu-budget", "8GiB"]
    one = plan_json(capsys, base)
    assert "per_gpu" not in one
    heads = plan_json(capsys, [*base, "--gpus", "2", "--split", "heads"])
    layers = plan_json(capsys, [*base, "--gpus", "2"])
    assert heads["gpus"] == layers["gpus"] == 2
    assert heads["split"] == "heads" and layers["split"] == "layers"
    # Tensor parallelism: every GPU runs every layer for one of the two kv heads.
    assert [(g["num_kv_heads"], g["num_q_heads"]) for g in heads["per_gpu"]] == [(1, 2)] * 2
    assert [g["layers"] for g in heads["per_gpu"]] == [[0, 1, 2]] * 2
    # device_map: contiguous layers, the first GPU one more.
    assert [g["layers"] for g in layers["per_gpu"]] == [[0, 1], [2]]
    assert [g["num_kv_heads"] for g in layers["per_gpu"]] == [2, 2]
    for plan in (heads, layers):
        per_gpu = [g["prefill"]["kv_total_bytes"] for g in plan["per_gpu"]]
        # Every KV byte on exactly one GPU: the GPUs' shares add up to the one-GPU total.
        assert sum(per_gpu) == one["kv_total_bytes"] == plan["kv_total_bytes"]
        assert plan["prefill"]["kv_total_bytes"] == one["kv_total_bytes"]
        assert sum(g["weight_bytes"] for g in plan["per_gpu"]) == pytest.approx(
            one["weight_bytes"], rel=1e-3
        )
        assert plan["fits"] is True and plan["longest_context"]["with_host"] is not None
    assert heads["per_gpu"][0]["prefill"]["kv_total_bytes"] == one["kv_total_bytes"] // 2
    assert heads["floors"]["prefill_s"] == pytest.approx(one["floors"]["prefill_s"] / 2)
    assert layers["floors"]["prefill_s"] == pytest.approx(one["floors"]["prefill_s"])

    assert run(["plan", *base, "--gpus", "2", "--split", "heads"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallelism (torchrun)" in out and "its 1 of 2 kv heads" in out
    assert "cuda:0" in out and "cuda:1" in out and "1 kv / 2 q heads" in out
    assert run(["plan", *base, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "device_map" in out and "layers 0-1" in out and "layer 2" in out

    # Heads that do not split evenly, and more GPUs than layers: refused, status 2.
    assert run(["plan", *base, "--gpus", "4", "--split", "heads"]) == 2
    assert "cannot be split evenly over 4" in capsys.readouterr().err
    assert run(["plan", *base, "--gpus", "4"]) == 2
    assert "at most one GPU per layer" in capsys.readouterr().err


def test_plan_longest_context_grows_with_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from headinfer.plan import make_plan

    config = _tiny_llama_folder(tmp_path, monkeypatch)
    fixed = make_plan(config, context=300, gpu_budget=1 << 40, chunk_size=64, dtype="bfloat16")
    # Each GPU's budget holds 16 MiB of KV beyond its fixed parts.
    budget = fixed["prefill"]["gpu_bytes"] - fixed["prefill"]["kv_device_bytes"] + (16 << 20)
    base = ["--model", str(tmp_path), "--force", "--chunk-size", "64", "--context", "300"]
    base += ["--gpu-budget", str(budget)]
    longest = {
        n: plan_json(capsys, [*base, "--gpus", str(n), "--split", "heads"])["longest_context"]
        for n in (1, 2)
    }
    # Two GPUs keep twice the KV resident; the host RAM is shared by both.
    assert longest[2]["resident"] > longest[1]["resident"]
    assert longest[2]["with_host"] > longest[1]["with_host"]
    n = longest[2]["with_host"]

    def ok(context: int) -> bool:
        kwargs = dict(gpu_budget=budget, chunk_size=64, dtype="bfloat16", gpus=2, split="heads")
        plan = make_plan(config, context=context, **kwargs)
        # Every GPU's budget holds its part, and the GPUs' host KV together fits the RAM.
        return plan["prefill"]["fits_gpu"] and plan["host_kv_bytes"] <= 64 << 20

    assert ok(n) and not ok(n + 1)


def test_generate_gpus_that_are_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model("llama").config.save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "hi", "--gpus"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert run([*argv, str(count + 2)]) == 2
    assert f"--gpus: {count + 2} asked for, but torch sees {count} CUDA GPU(s)" in (
        capsys.readouterr().err
    )
    # Under torchrun, --gpus must be its process count (tensor parallelism, one GPU each).
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run([*argv, "3"]) == 2
    assert "--nproc-per-node 3" in capsys.readouterr().err
