"""The planner's decision on the CPU share (``planner.plan_share``) and the ``cpu_heads``
argument of ``patch()`` and ``HeadInferCache`` (the per-step balance is Rust's, tested in
tests/rust/attention/policy.rs; the GPU runs in tests/gpu/test_share_gpu.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from _rates import CoreStandIn
from _tiny import tiny_config, tiny_model

import headinfer
from headinfer import planner
from headinfer.checks import check_cpu_heads
from headinfer.planner import MIN_SHARE_CORES, SharePlan, plan_share
from headinfer.share import ShareRates, load_rates, machine_key, physical_cores, share_threads

H200 = ShareRates(pcie=51e9, cpu=40e9, device=2.5e12, handoff=1e-4)
SHAPE = {"device_index": 0, "gpu_name": "NVIDIA H200", "dtype": "bfloat16", "head_dim": 128}


class Probe:
    """Stands in for the GPU probe (no GPU here): counts calls, returns fixed rates or
    raises; the real probe runs in tests/gpu/test_share_gpu.py."""

    def __init__(self, rates: ShareRates | None = H200) -> None:
        self.rates = rates
        self.calls: list[dict[str, Any]] = []

    def __call__(self, device_index: int, **kw: Any) -> ShareRates:
        self.calls.append({"device_index": device_index, **kw})
        if self.rates is None:
            raise RuntimeError("probe failed (test)")
        return self.rates


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    p = Probe()
    monkeypatch.setattr(planner, "measure_rates", p)
    monkeypatch.delenv("HEADINFER_REPROBE", raising=False)
    return p


def test_cpu_heads_accepts_auto_an_int_or_none_and_names_itself() -> None:
    assert check_cpu_heads(None, 8) is None
    assert check_cpu_heads("auto", 8) == "auto"
    assert check_cpu_heads(0, 8) == 0
    assert check_cpu_heads(8, 8) == 8
    with pytest.raises(ValueError, match="^cpu_heads: expected an int or 'auto', got 'all'"):
        check_cpu_heads("all", 8)
    for bad in (1.5, 2.0, True, [1]):
        with pytest.raises(TypeError, match="^cpu_heads: expected an int or 'auto'"):
            check_cpu_heads(bad, 8)
    with pytest.raises(ValueError, match="^cpu_heads: must be between 0 and 8"):
        check_cpu_heads(9, 8)
    with pytest.raises(ValueError, match="^cpu_heads: must be between 0 and 16"):
        check_cpu_heads(17, 32)
    with pytest.raises(ValueError, match="^cpu_heads: must be between 0"):
        check_cpu_heads(-1, 8)


def test_patch_and_the_cache_check_cpu_heads() -> None:
    model = tiny_model("llama")
    for value in ("auto", None, 0, 1):
        headinfer.patch(model, cpu_heads=value)
        assert model._headinfer.cpu_heads == value
    headinfer.unpatch(model)
    with pytest.raises(ValueError, match="^cpu_heads:"):
        headinfer.patch(model, cpu_heads="fast")
    with pytest.raises(TypeError, match="^cpu_heads:"):
        headinfer.HeadInferCache(tiny_config("llama"), cpu_heads=1.0)
    assert headinfer.HeadInferCache(tiny_config("llama"), cpu_heads="auto").cpu_heads == "auto"


def test_the_default_is_auto(probe: Probe, tmp_path: Path) -> None:
    p = plan_share(None, group=4, cores=64, path=tmp_path / "r.json", **SHAPE)
    assert p.mode == "rates" and p.rates == H200 and p.threads == 63
    assert len(probe.calls) == 1


def test_zero_turns_the_share_off_and_an_int_overrides(probe: Probe, tmp_path: Path) -> None:
    off = plan_share(0, group=4, cores=64, path=tmp_path / "r.json", **SHAPE)
    assert off.mode == "off" and "cpu_heads=0" in off.reason
    # The rates are measured anyway: they choose how the GPU reads host blocks.
    assert off.rates == H200
    heads = plan_share(3, group=4, cores=64, path=tmp_path / "r.json", **SHAPE)
    assert heads.mode == "heads" and heads.cpu_heads == 3 and heads.threads == 63
    # An override runs even on a small host (the user asked), on at least one thread.
    assert plan_share(2, group=4, cores=1, path=tmp_path / "r.json", **SHAPE).threads == 1
    # Measured once for this machine (cores=1 is another key), then read from the file.
    assert len(probe.calls) == 2


def test_auto_is_off_with_few_cores(probe: Probe, tmp_path: Path) -> None:
    for cores in (1, 2, MIN_SHARE_CORES - 1):
        p = plan_share("auto", group=4, cores=cores, path=tmp_path / "r.json", **SHAPE)
        assert p.mode == "off" and f"{cores} physical cores" in p.reason
        assert p.rates == H200  # for the reader


def test_this_two_core_machine_keeps_auto_off(probe: Probe, tmp_path: Path) -> None:
    if physical_cores() >= MIN_SHARE_CORES:
        pytest.skip("this host has the cores for the CPU share")
    p = plan_share("auto", group=4, path=tmp_path / "r.json", **SHAPE)
    assert p.mode == "off" and p.cores == physical_cores()


def _probed(kv_dtype: str) -> dict[str, object]:
    """What ``plan_share`` asks the probe for SHAPE's store (group 4, 15 threads)."""
    return {
        "device_index": 0,
        "dtype": "bfloat16",
        "head_dim": 128,
        "group": 4,
        "threads": 15,
        "kv_dtype": kv_dtype,
    }


def test_auto_measures_once_then_reads_the_file(probe: Probe, tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    first = plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    assert first.mode == "rates" and first.rates == H200 and first.threads == 15
    assert first.rates_source is not None and first.rates_source.startswith("measured now")
    assert probe.calls == [_probed("exact")]
    key = machine_key("NVIDIA H200", dtype="bfloat16", head_dim=128, group=4, threads=15, cores=16)
    assert load_rates(key, path) == H200
    second = plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    assert second.mode == "rates" and second.rates == H200
    assert second.rates_source == f"cached in {path}"
    assert len(probe.calls) == 1
    # Another shape is another entry: measured.
    plan_share("auto", group=2, cores=16, path=path, **SHAPE)
    assert len(probe.calls) == 2
    # A re-probe, by argument or by the environment, measures again and rewrites the entry.
    probe.rates = ShareRates(pcie=50e9, cpu=60e9, device=2e12, handoff=2e-4)
    assert plan_share("auto", group=4, cores=16, path=path, reprobe=True, **SHAPE).rates == (
        probe.rates
    )
    assert load_rates(key, path) == probe.rates
    assert len(probe.calls) == 3


def test_an_int8_store_has_rates_of_its_own(probe: Probe, tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    exact = plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    assert exact.rates == H200 and probe.calls[-1]["kv_dtype"] == "exact"
    # The int8 kernel on the CPU reads fewer stored bytes per second: measured for int8.
    probe.rates = ShareRates(pcie=51e9, cpu=25e9, device=2.5e12, handoff=1e-4)
    int8 = plan_share("auto", group=4, cores=16, path=path, kv_dtype="int8", **SHAPE)
    assert int8.mode == "rates" and int8.rates == probe.rates
    assert probe.calls[-1] == _probed("int8")
    key = machine_key("NVIDIA H200", dtype="bfloat16", head_dim=128, group=4, threads=15, cores=16)
    assert load_rates(key, path) == H200
    assert load_rates(key + " | kv_dtype int8", path) == probe.rates
    # Each is read from the file from now on, the exact store's unchanged.
    assert plan_share("auto", group=4, cores=16, path=path, **SHAPE).rates == H200
    again = plan_share("auto", group=4, cores=16, path=path, kv_dtype="int8", **SHAPE)
    assert again.rates == probe.rates and again.rates_source == f"cached in {path}"
    assert len(probe.calls) == 2


def test_an_int8_cache_asks_for_int8_rates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a CUDA store's cache asks for, through the real planner, rates file and CPU probe;
    # no GPU here: its name and its probe's rates are stood in for.
    import torch

    from headinfer import share

    core = CoreStandIn()
    monkeypatch.setattr(share, "_core", core)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setenv("HEADINFER_RATES_FILE", str(tmp_path / "rates.json"))
    monkeypatch.delenv("HEADINFER_REPROBE", raising=False)
    config = tiny_config("llama")
    plans = {}
    for kv_dtype in ("exact", "int8", "exact", "int8"):
        cache = headinfer.HeadInferCache(config, kv_dtype=kv_dtype, cpu_heads="auto")
        plans[kv_dtype] = cache._plan_share(0, torch.bfloat16, 16)
    # Measured once each (then read from the file), the CPU's kernel over the store's format.
    head_dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    assert [c["kv_dtype"] for c in core.cpu_calls] == [None, "int8"]
    for c in core.cpu_calls:
        assert (c["dtype"], c["head_dim"], c["group"], c["threads"]) == (
            "bfloat16",
            head_dim,
            group,
            15,
        )
    for plan in plans.values():
        assert plan.mode == "rates" and plan.rates is not None and plan.rates.cpu > 0
    assert plans["exact"].rates != plans["int8"].rates  # two probes of the CPU
    key = machine_key(
        "NVIDIA H200", dtype="bfloat16", head_dim=head_dim, group=group, threads=15, cores=16
    )
    saved = json.loads((tmp_path / "rates.json").read_text())
    assert sorted(saved) == [key, key + " | kv_dtype int8"]
    assert saved[key + " | kv_dtype int8"]["cpu"] == plans["int8"].rates.cpu


def test_reprobe_from_the_environment(
    probe: Probe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rates.json"
    plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    monkeypatch.setenv("HEADINFER_REPROBE", "1")
    plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    assert len(probe.calls) == 2
    monkeypatch.setenv("HEADINFER_REPROBE", "0")
    plan_share("auto", group=4, cores=16, path=path, **SHAPE)
    assert len(probe.calls) == 2


def test_a_failed_probe_leaves_the_share_off_and_says_why(
    probe: Probe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe.rates = None
    with caplog.at_level(logging.WARNING, logger="headinfer"):
        p = plan_share("auto", group=4, cores=16, path=tmp_path / "r.json", **SHAPE)
    assert p.mode == "off" and "probe failed (test)" in p.reason and p.rates is None
    assert "measuring the decode rates failed" in caplog.text
    assert not (tmp_path / "r.json").exists()


def test_a_cpu_rate_of_zero_keeps_the_share_off(probe: Probe, tmp_path: Path) -> None:
    probe.rates = ShareRates(pcie=51e9, cpu=0.0, device=2.5e12, handoff=0.0)
    p = plan_share("auto", group=4, cores=16, path=tmp_path / "r.json", **SHAPE)
    assert p.mode == "off" and p.rates == probe.rates


def test_the_plan_is_json(probe: Probe, tmp_path: Path) -> None:
    p = plan_share("auto", group=4, cores=16, path=tmp_path / "r.json", **SHAPE)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["mode"] == "rates" and d["rates"]["pcie"] == 51e9 and d["threads"] == 15
    assert d["torch_threads"] >= 1 and d["cores"] == 16
    assert SharePlan("off", "why").to_dict()["rates"] is None


def test_a_cpu_cache_says_it_shares_nothing() -> None:
    model = tiny_model("llama")
    cache = headinfer.HeadInferCache(model, block_size=16)
    d = cache.share_plan()
    assert d["mode"] == "off" and "CPU" in d["reason"] and "split" not in d
    unmade = headinfer.HeadInferCache(tiny_config("llama"), block_size=16)
    assert unmade.share_plan()["mode"] == "off"
    assert share_threads() == max(physical_cores() - 1, 0)


def test_the_trial_keeps_the_faster_mode() -> None:
    from headinfer.planner import ShareTrial

    for share_time, alone_time, keep in [(0.1, 0.2, True), (0.3, 0.2, False)]:
        t = ShareTrial(steps=3, warmup=1)
        modes = []
        while t.decided is None:
            on = t.mode()
            modes.append(on)
            t.record(on, share_time if on else alone_time)
        assert t.decided is keep
        # Warm-up with the share, then alternating, three of each.
        assert modes == [True, True, False, True, False, True, False]
        assert t.mode() is keep
        t.record(not keep, 0.0)  # after the decision, timings change nothing
        assert t.decided is keep
        d = t.to_dict()
        assert len(d["with_share"]) == 3 and len(d["alone"]) == 3
    # One slow outlier does not decide: the median does.
    t = ShareTrial(steps=3, warmup=0)
    for on, secs in [(True, 0.1), (False, 0.2), (True, 5.0), (False, 0.2), (True, 0.1)]:
        t.record(on, secs)
    assert t.decided is None
    t.record(False, 0.2)
    assert t.decided is True
