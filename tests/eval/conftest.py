"""What the runner tests share: the session's SmolLM2 in place of each runner's own load."""

from __future__ import annotations

from typing import Any

import pytest

from headinfer.eval import longbench, ruler


@pytest.fixture
def runner_model(smollm2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``smollm2``, also what ``ruler.main`` and ``longbench.main`` load (no second copy)."""
    for runner in (ruler, longbench):
        monkeypatch.setattr(runner, "load_model", lambda name, device, dtype, gpus=None: smollm2)
    return smollm2
