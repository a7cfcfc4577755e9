"""Shared set-up of the GPU tests: a way to put every KV byte in host memory."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def kv_on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CUDA cache made in the test plans no resident KV: all of it is read from pinned
    host memory (a ``gpu_budget`` too small for the working set is refused before prefill, so
    a tiny budget no longer does this)."""
    import headinfer.cache as cache_mod

    original = cache_mod.plan_memory

    def on_host(*args, **kwargs):
        plan = original(*args, **kwargs)
        plan.kv_device_bytes = 0
        return plan

    monkeypatch.setattr(cache_mod, "plan_memory", on_host)
    assert torch.cuda.is_available()
