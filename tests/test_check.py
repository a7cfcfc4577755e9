"""``headinfer check`` on the CPU: the report and its JSON, the self-test of every family (and
its failure: exit status 1), and its prediction against ``headinfer plan``'s for the same
inputs. The GPU modes of the self-test and the GPU rates run where there is a GPU
(``headinfer check`` on the GPU machine; BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from headinfer import _core
from headinfer.cli import main
from headinfer.selfcheck import default_config
from headinfer.selftest import FAIL_ENV, run_self_test
from headinfer.share import ShareRates
from headinfer.tiny import FAMILIES, MULTIMODAL, have

GPU = torch.cuda.is_available() and _core.cuda_status() is None


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(autouse=True)
def _rates_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # What check saves (on a GPU host) goes to a file of the test's own.
    path = tmp_path / "rates.json"
    monkeypatch.setenv("HEADINFER_RATES_FILE", str(path))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str]:
    """One full ``headinfer check --json`` (every family's self-test), with its stderr."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HEADINFER_RATES_FILE", str(tmp_path_factory.mktemp("rates") / "rates.json"))
    # capsys is function-scoped: capture by hand.
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = run(["check", "--json", "--gpu-budget", "20GiB", "--context", "64K"])
    finally:
        mp.undo()
    return status, json.loads(out.getvalue()), err.getvalue()


def test_the_report_has_every_part(report: tuple[int, dict[str, Any], str]) -> None:
    status, r, err = report
    assert status == 0
    env = r["environment"]
    for key in (
        "headinfer",
        "torch",
        "transformers",
        "python",
        "cuda_ok",
        "cuda_status",
        "gpus",
        "physical_cores",
        "cpu_isa",
        "ram_total_bytes",
        "ram_available_bytes",
        "memlock_limit_bytes",
    ):
        assert key in env, key
    assert env["headinfer"] == _core.__version__
    assert env["cpu_isa"] == _core.cpu_isa()
    assert env["cuda_ok"] == (_core.cuda_status() is None)
    assert (len(env["gpus"]) > 0) == torch.cuda.is_available()
    rates = r["rates"]["rates"]
    assert rates["cpu"] > 0 and rates["handoff"] >= 0
    if GPU:
        # Every field the runtime balances, whatever ShareRates holds, and the copy engine's.
        for name in (f.name for f in dataclasses.fields(ShareRates)):
            assert rates[name] >= 0, name
        assert rates["h2d_copy"] > 0 and r["rates"]["saved_to"]
    else:
        assert r["rates"]["saved_to"] is None
    # Progress went to stderr as it ran.
    assert "self-test: every family" in err and "[1/" in err


def test_the_self_test_passes_for_every_family(report: tuple[int, dict[str, Any], str]) -> None:
    _, r, _ = report
    assert r["self_test_ok"] is True
    tests = r["self_test"]
    assert {t["family"] for t in tests} == {f for f in FAMILIES + MULTIMODAL if have(f)}
    modes = {t["mode"] for t in tests}
    assert modes == ({"cpu", "resident", "streamed", "shared"} if GPU else {"cpu"})
    for t in tests:
        assert t["ok"] and t["error"] is None, t
        assert 0 <= t["err"] <= t["limit"], t


def test_a_failing_family_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(FAIL_ENV, "gemma2")
    assert run(["check", "--gpu-budget", "20GiB"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith("gemma2 ")]
    assert lines and all("FAIL" in line for line in lines), out
    assert "FAIL (exit status 1)" in out
    assert any(line.strip().startswith("llama ") and "PASS" in line for line in out.splitlines())


def test_an_error_inside_a_family_is_reported_not_raised() -> None:
    # The next fresh KV block fails (the Rust failure point): that run fails with the error.
    _core._inject_failure("alloc")
    try:
        (got,) = run_self_test(gpu=False, families=("llama",))
    finally:
        _core._inject_failure(None)
    assert not got.ok and got.err is None
    assert got.error is not None and "alloc" in got.error


@pytest.mark.parametrize("context", ["64K", "1M"])
def test_the_prediction_is_plans(
    context: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default_config().save_pretrained(tmp_path)
    common = ["--model", str(tmp_path), "--context", context, "--gpu-budget", "20GiB"]
    run(["plan", *common, "--json", "--force"])
    plan = json.loads(capsys.readouterr().out)
    assert run(["check", *common, "--json", "--no-self-test"]) == 0
    expect = json.loads(capsys.readouterr().out)["expect"]
    assert expect["decode_s_per_token"] == plan["floors"]["decode_s_per_token"]
    assert expect["prefill_s"] == plan["floors"]["prefill_s"]
    assert expect["kv_host_bytes"] == plan["decode"]["kv_host_bytes"]
    # The same search; the host's available RAM moved between the two runs, if at all.
    per_token = plan["kv_bytes_per_token_layer"] * plan["num_layers"]
    moved = abs(expect["ram_available_bytes"] - plan["machine"]["ram_available_bytes"])
    assert abs(expect["longest_context"] - plan["longest_context"]["with_host"]) <= (
        moved // per_token + 1
    )
    assert expect["rates_source"] == plan["floors"]["source"]
    if not GPU:
        assert expect["rates_source"].startswith("H200 constants")


def test_an_int8_check_measures_and_predicts_int8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default_config().save_pretrained(tmp_path)
    common = ["--model", str(tmp_path), "--context", "64K", "--gpu-budget", "20GiB"]
    run(["plan", *common, "--json", "--kv-dtype", "int8"])
    plan = json.loads(capsys.readouterr().out)
    assert run(["check", *common, "--json", "--no-self-test", "--kv-dtype", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The CPU share's rate over int8 rows (in their stored bytes), saved under the int8 key.
    assert report["rates"]["kv_dtype"] == "int8" and report["rates"]["rates"]["cpu"] > 0
    if GPU:
        assert report["rates"]["key"].endswith(" | kv_dtype int8")
    expect = report["expect"]
    assert expect["kv_dtype"] == "int8"
    assert expect["kv_host_bytes"] == plan["decode"]["kv_host_bytes"]
    assert expect["decode_s_per_token"] == plan["floors"]["decode_s_per_token"]
    # The text says so too; an exact check says nothing of a kv dtype.
    assert run(["check", *common, "--no-self-test", "--kv-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    assert "the CPU share over int8 KV" in out
    assert "65,536 tokens, bfloat16, int8 KV" in out
    assert run(["check", *common, "--no-self-test"]) == 0
    out = capsys.readouterr().out
    assert "int8 KV" not in out and "65,536 tokens, bfloat16\n" in out


def test_the_default_model_is_the_llama_3_8b_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", "--no-self-test", "--gpu-budget", "20GiB"]) == 0
    out = capsys.readouterr().out
    for part in ("environment", "rates (measured now", "what to expect: Llama-3-8B shape"):
        assert part in out, out
    assert "decode floor" in out and "longest context" in out
    assert "self-test: not run (--no-self-test)" in out


def test_plan_says_which_rates_it_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default_config().save_pretrained(tmp_path)
    common = ["--model", str(tmp_path), "--context", "1M", "--gpu-budget", "20GiB", "--force"]
    run(["plan", *common, "--h2d-gbs", "10"])
    out = capsys.readouterr().out
    assert "host-to-device 10 GB/s: --h2d-gbs" in out
    run(["plan", *common])
    out = capsys.readouterr().out
    if not GPU:
        assert "55 GB/s: H200 constants" in out


def test_check_refuses_an_unsupported_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path)
    assert run(["check", "--model", str(tmp_path), "--no-self-test"]) == 2
    assert "--model" in capsys.readouterr().err


def test_check_downloads_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", "--model", "no-such-org/no-such-model", "--no-self-test"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_the_cpu_share_estimate_balances_both_sides() -> None:
    from headinfer.selfcheck import share_estimate

    rates = {"pcie": 50e9, "device": 1e12, "cpu": 50e9, "handoff": 0.0}
    # Equal rates: the CPU takes half the host bytes, and the step takes half as long.
    got = share_estimate(rates, device_bytes=0, host_bytes=2e9, layers=2)
    assert got == pytest.approx(2e9 / 50e9 / 2)
    # A slower CPU takes less: both sides finish together, sooner than the GPU alone.
    slow = share_estimate({**rates, "cpu": 25e9}, device_bytes=0, host_bytes=2e9, layers=2)
    assert slow == pytest.approx(2e9 / (50e9 + 25e9))
    # A hand-off costlier than the step: the GPU alone.
    alone = 1e12 / 1e12 + 2e9 / 50e9
    costly = {**rates, "handoff": 10.0}
    assert share_estimate(costly, device_bytes=1e12, host_bytes=2e9, layers=2) == alone
    assert share_estimate({**rates, "cpu": 0.0}, device_bytes=0, host_bytes=1, layers=1) is None
    assert share_estimate(rates, device_bytes=1, host_bytes=0, layers=1) is None
