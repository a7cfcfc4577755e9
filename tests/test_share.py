"""headinfer.share: the CPU share's cores, its rates file, and the rate probe and balance
bindings it uses (the GPU probe runs in tests/gpu/test_share_gpu.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from _rates import CoreStandIn

from headinfer import _core, share
from headinfer.share import (
    RATES_FILE_ENV,
    RATES_VERSION,
    ShareRates,
    cpu_model,
    kv_label,
    load_rates,
    machine_key,
    measure_rates,
    physical_cores,
    rates_path,
    save_rates,
    share_threads,
)

H200 = ShareRates(pcie=51e9, cpu=40e9, device=2.5e12, handoff=1e-4)


def _topology(root: Path, cpu: int, package: int, core: int) -> None:
    topo = root / f"cpu{cpu}" / "topology"
    topo.mkdir(parents=True)
    (topo / "physical_package_id").write_text(f"{package}\n")
    (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_smt_siblings_once(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 threads; the process may run on 6 of the 8 CPUs.
    for cpu in range(8):
        _topology(tmp_path, cpu, package=cpu // 4, core=(cpu % 4) // 2)
    assert physical_cores(set(range(8)), str(tmp_path)) == 4
    assert physical_cores({0, 1, 2, 3, 4, 5}, str(tmp_path)) == 3
    assert physical_cores({0, 1}, str(tmp_path)) == 1
    # No topology in sysfs: every CPU counts.
    assert physical_cores({0, 1, 2}, str(tmp_path / "none")) == 3
    assert 1 <= physical_cores() <= 4096


def test_share_threads_leave_one_core_to_drive_the_gpu() -> None:
    assert share_threads(16) == 15
    assert share_threads(2) == 1
    assert share_threads(1) == 0
    assert share_threads() == max(physical_cores() - 1, 0)


def test_the_rates_file_round_trips_and_keeps_other_entries(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rates.json"
    assert load_rates("a", path) is None  # no file yet
    assert save_rates("a", H200, path) == path
    other = ShareRates(pcie=25e9, cpu=0.0, device=1e12, handoff=0.0)
    save_rates("b", other, path)
    assert load_rates("a", path) == H200
    assert load_rates("b", path) == other
    assert load_rates("c", path) is None
    data = json.loads(path.read_text())
    assert data["a"]["version"] == RATES_VERSION and data["a"]["measured"] > 0
    # Another version of the format is measured again.
    data["a"]["version"] = RATES_VERSION + 1
    path.write_text(json.dumps(data))
    assert load_rates("a", path) is None
    # No temporary files left behind.
    assert [p.name for p in path.parent.iterdir()] == ["rates.json"]


def test_a_broken_rates_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rates.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="headinfer"):
        assert load_rates("a", path) is None
    assert "ignoring the rates file" in caplog.text
    # ... and rewritten by the next save.
    save_rates("a", H200, path)
    assert load_rates("a", path) == H200
    bad = {"a": {"version": RATES_VERSION, "pcie": -1, "cpu": 1, "device": 1, "handoff": 0}}
    path.write_text(json.dumps(bad))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headinfer"):
        assert load_rates("a", path) is None
    assert "pcie must be a number" in caplog.text


def test_share_rates_from_a_dict_name_the_bad_field() -> None:
    d = {"pcie": 1.0, "cpu": 2.0, "device": 3.0, "handoff": 0.0}
    # The copy engine's rate is optional (0: not measured).
    assert ShareRates.from_dict(d).as_tuple() == (1.0, 2.0, 3.0, 0.0, 0.0)
    assert ShareRates.from_dict({**d, "copy": 5.0}).copy == 5.0
    for name, value in [
        ("cpu", None),
        ("handoff", -1.0),
        ("device", "fast"),
        ("pcie", True),
        ("copy", -2.0),
    ]:
        with pytest.raises(ValueError, match=f"^rates: {name} must be"):
            ShareRates.from_dict({**d, name: value})
    with pytest.raises(ValueError, match="^rates: pcie and device must be positive"):
        ShareRates.from_dict({**d, "device": 0})
    with pytest.raises(ValueError, match="^rates: expected an object"):
        ShareRates.from_dict([1, 2])


def test_rates_path_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RATES_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rates_path() == tmp_path / "headinfer" / "rates.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert rates_path() == Path.home() / ".cache" / "headinfer" / "rates.json"
    monkeypatch.setenv(RATES_FILE_ENV, str(tmp_path / "x.json"))
    assert rates_path() == tmp_path / "x.json"


def test_machine_keys_tell_machines_and_shapes_apart() -> None:
    kw = {"dtype": "bfloat16", "head_dim": 128, "group": 4, "threads": 15, "cores": 16}
    a = machine_key("NVIDIA H200", **kw)
    assert a == machine_key("NVIDIA H200", **kw)
    assert "NVIDIA H200" in a and "16 cores" in a and "bfloat16" in a
    assert a != machine_key("NVIDIA H100", **kw)
    assert a != machine_key("NVIDIA H200", **{**kw, "head_dim": 64})
    assert a != machine_key("NVIDIA H200", **{**kw, "threads": 7})


KEY_SHAPE = {"dtype": "bfloat16", "head_dim": 128, "group": 4, "threads": 15, "cores": 16}


def test_machine_keys_tell_kv_dtypes_apart_and_keep_exact_keys() -> None:
    exact = machine_key("NVIDIA H100", **KEY_SHAPE)
    # An exact store's key is the one written before kv dtypes were part of keys.
    assert exact == (
        f"NVIDIA H100 | {cpu_model()} | 16 cores | 15 threads | bfloat16 | head_dim 128 | group 4"
    )
    assert machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype="exact") == exact
    assert machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype=None) == exact
    int8 = machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype="int8")
    assert int8 == exact + " | kv_dtype int8"
    assert machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype=" INT8") == int8
    with pytest.raises(ValueError, match="^kv_dtype: "):
        machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype="int4")


def test_an_exact_entry_serves_exact_stores_and_older_versions_are_measured_again(
    tmp_path: Path,
) -> None:
    # An exact store's key has no kv dtype in it, as before int8 stores had keys of their own.
    path = tmp_path / "rates.json"
    exact = machine_key("NVIDIA H100", **KEY_SHAPE)
    entry = {"pcie": 51e9, "cpu": 40e9, "device": 2.5e12, "handoff": 1e-4, "copy": 0.0}
    path.write_text(json.dumps({exact: {**entry, "version": RATES_VERSION, "measured": 0.0}}))
    assert load_rates(exact, path) == H200
    # Version 2's GPU rates were an exact kernel's whatever the store: a file of that version
    # is measured again.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({exact: {**entry, "version": 2, "measured": 0.0}}))
    assert load_rates(exact, old) is None
    # An int8 store's entry is its own: not there yet (measured, then saved beside it).
    int8 = machine_key("NVIDIA H100", **KEY_SHAPE, kv_dtype="int8")
    assert load_rates(int8, path) is None
    slower = ShareRates(pcie=51e9, cpu=25e9, device=2.5e12, handoff=1e-4)
    save_rates(int8, slower, path)
    assert load_rates(int8, path) == slower and load_rates(exact, path) == H200


def test_the_gpu_probe_checks_its_kv_dtype_before_the_device() -> None:
    # As the CPU probe's: a bad kv_dtype is named, on a host with or without a GPU.
    for bad in ("int4", "float16", "exact"):
        with pytest.raises(ValueError, match="^kv_dtype: .*int8"):
            _core.measure_gpu_rates(0, "bfloat16", 128, 4, kv_dtype=bad)


def test_the_cpu_probe_measures_the_kv_dtype_it_is_given() -> None:
    kw: dict[str, Any] = {"threads": 1, "bytes": 4 << 20, "seconds": 0}
    for kv_dtype in (None, "bfloat16", "int8"):
        rate, fixed = _core.measure_cpu_rate("bfloat16", 128, 4, kv_dtype=kv_dtype, **kw)
        assert rate > 1e6 and 0 < fixed < 1.0, kv_dtype
    rate, fixed = _core.measure_cpu_rate("float32", 80, 1, kv_dtype="int8", **kw)
    assert rate > 1e6 and 0 < fixed < 1.0
    # As KVStore's kv_dtype: None or the dtype's own name is exact ("exact" is the Python
    # layer's word, which share.measure_rates turns into None).
    for bad in ("int4", "float16", "exact"):
        with pytest.raises(ValueError, match="^kv_dtype: .*int8"):
            _core.measure_cpu_rate("bfloat16", 128, 4, kv_dtype=bad, **kw)
    with pytest.raises(TypeError):
        _core.measure_cpu_rate("bfloat16", 128, 4, kv_dtype=8, **kw)  # type: ignore[arg-type]


def test_measure_rates_passes_the_kv_dtype_to_both_probes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = CoreStandIn()
    monkeypatch.setattr(share, "_core", core)
    shape: dict[str, Any] = {"dtype": "bfloat16", "head_dim": 128, "group": 4, "threads": 1}
    with caplog.at_level(logging.INFO, logger="headinfer"):
        exact = measure_rates(0, **shape)
        int8 = measure_rates(0, **shape, kv_dtype="int8")
        measure_rates(0, **shape, kv_dtype=None)
    # The store's argument: None for exact (as before), "int8" for int8; beside GPU 0's copies.
    assert [c["kv_dtype"] for c in core.cpu_calls] == [None, "int8", None]
    assert all(c["beside_copy"] == 0 and c["threads"] == 1 for c in core.cpu_calls)
    # The GPU's probes too: an int8 store's reader is chosen on its own kernel's rates.
    assert [c["kv_dtype"] for c in core.gpu_calls] == [None, "int8", None]
    for r in (exact, int8):
        assert r.cpu > 1e6 and r.handoff > 0 and (r.pcie, r.device, r.copy) == (51e9, 2.5e12, 55e9)
    # The log says which KV the CPU's rate was measured over.
    assert "exact bfloat16 KV" in caplog.text and "int8 KV" in caplog.text
    with pytest.raises(ValueError, match="^kv_dtype: "):
        measure_rates(0, **shape, kv_dtype="int4")
    assert len(core.cpu_calls) == 3
    assert (
        kv_label("float16", "exact") == "exact float16" and kv_label("bfloat16", "int8") == "int8"
    )


def test_the_cpu_probe_measures_this_host() -> None:
    rate, fixed = _core.measure_cpu_rate("bfloat16", 64, 4, threads=1, bytes=4 << 20, seconds=0)
    assert rate > 1e6 and 0 < fixed < 1.0
    with pytest.raises(TypeError, match="^dtype:"):
        _core.measure_cpu_rate("int8", 64, 4)
    with pytest.raises(ValueError, match="^seconds:"):
        _core.measure_cpu_rate("float32", 64, 4, seconds=-1.0)
    with pytest.raises(ValueError, match="^head_dim:"):
        _core.measure_cpu_rate("float32", 0, 4)


def test_share_split_balances_one_layer() -> None:
    # 128K tokens, 8 heads, every block on the host: the CPU takes a suffix of each head.
    heads = [(0, 131072, 0)] * 8
    kw = {"len": 131072, "block_size": 4096, "token_bytes": 512, "heads": heads}
    s = _core.share_split(H200.as_tuple(), **kw)
    assert s is not None
    assert len(s["from"]) == 8
    assert all(f % 4096 == 0 and 0 < f < 131072 for f in s["from"])
    assert s["cpu_bytes"] == sum(131072 - f for f in s["from"]) * 512
    assert max(s["gpu_seconds"], s["cpu_seconds"]) < s["alone_seconds"]
    assert abs(s["gpu_seconds"] - s["cpu_seconds"]) < 4096 * 512 * (1 / 51e9 + 1 / 40e9)
    # No CPU rate, or no host bytes: the GPU alone.
    assert _core.share_split((51e9, 0.0, 2.5e12, 1e-4), **kw) is None
    kw["heads"] = [(131072, 0, 131072)] * 8
    assert _core.share_split(H200.as_tuple(), **kw) is None
    with pytest.raises(ValueError, match="^rates: pcie"):
        _core.share_split((0.0, 1.0, 1.0, 0.0), **kw)
    with pytest.raises(ValueError, match="^block_size:"):
        _core.share_split(H200.as_tuple(), **{**kw, "block_size": 0})
