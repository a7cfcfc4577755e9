"""A model's config from what a user names: ``smollm2``, a local folder, a GGUF file, a
``config.json``, or a Hugging Face Hub id already downloaded (or downloadable). Only the config
is read, no weights: what ``headinfer plan`` and ``headinfer check`` plan from, and what
``headinfer generate`` checks before it loads the weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["ModelNotFoundError", "load_config"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(ValueError):
    """A model name or path that leads to no config; the message says what to give instead."""


def load_config(
    model: str, gguf_file: str | None = None, *, local_files_only: bool = False
) -> tuple[Any, str]:
    """The config of ``model``: ``smollm2``, a local folder (or GGUF file), or a Hub id
    (with ``local_files_only``, only one already in the Hugging Face cache: no network).

    Only ``config.json`` (or a GGUF file's metadata) is read; no weights.

    Returns:
        ``(config, label)``: the label names the model in reports.

    Raises:
        ModelNotFoundError: nothing there, a folder without ``config.json``, an unknown name.
    """
    from transformers import AutoConfig

    if model.strip().lower() == "smollm2":
        return _smollm2_config(), "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_pretrained(AutoConfig, str(path.parent), gguf_file=path.name), path.name
    if path.is_file():
        # A config.json itself.
        return _from_pretrained(AutoConfig, str(path)), path.parent.name or str(path)
    if path.is_dir():
        if gguf_file is not None:
            return _from_pretrained(AutoConfig, str(path), gguf_file=gguf_file), gguf_file
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {model}: the folder has no config.json; point --model at a Hugging "
                "Face model folder (config.json and weights, as save_pretrained writes it), or "
                "name its GGUF file with --gguf-file"
            )
        return _from_pretrained(AutoConfig, str(path)), path.name
    if model.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"--model {model}: no such file or folder")
    if not _HUB_ID.fullmatch(model):
        raise ModelNotFoundError(
            f"--model {model}: unknown model; give 'smollm2' (the bundled SmolLM2-135M), a "
            "local model folder with a config.json, or a Hugging Face Hub id such as "
            "'Qwen/Qwen2.5-7B-Instruct'"
        )
    try:
        kwargs: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
        if local_files_only:
            kwargs["local_files_only"] = True
        return AutoConfig.from_pretrained(model, **kwargs), model
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "in the Hugging Face cache" if local_files_only else "loadable from the Hub"
        raise ModelNotFoundError(
            f"--model {model}: not a local folder and not {where} ({first}); download it "
            f"first (hf download {model}) or pass its local folder"
        ) from exc


def _from_pretrained(auto: Any, where: str, **kwargs: Any) -> Any:
    try:
        return auto.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"--model {where}: cannot read its config ({first})") from exc


def _smollm2_config() -> Any:
    """SmolLM2's config: the cached folder's if it was built, else the GGUF's metadata."""
    from transformers import AutoConfig

    from .smollm2 import _SMOLLM2_DIRNAME, cache_dir, smollm2_gguf_path

    folder = cache_dir() / _SMOLLM2_DIRNAME
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder))
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"--model smollm2: {exc}") from exc
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
