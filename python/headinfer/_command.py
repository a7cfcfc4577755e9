"""What the ``headinfer`` command and the eval runners share: option types, options, and
loading a model.

Each option type raises ``argparse.ArgumentTypeError`` with the parser's own words, less their
``name:`` prefix (argparse names the option itself).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .device import resolve_device
from .kv_dtype import KV_DTYPES
from .plan import parse_dtype
from .sizes import parse_bytes, parse_context

__all__ = [
    "add_device",
    "add_gpu_budget",
    "add_kv_dtype",
    "context",
    "device",
    "dtype",
    "dtype_or_auto",
    "fraction",
    "is_smollm2",
    "load_pretrained",
    "non_negative",
    "positive",
    "size",
]


_T = TypeVar("_T")


def _checked(parse: Callable[[str], _T], prefix: str, text: str) -> _T:
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(prefix)) from None


def size(text: str) -> int:
    # argparse turns the ValueError's absence of a message into "invalid size value", so raise
    # ArgumentTypeError with parse_bytes' own words.
    try:
        return parse_bytes(text, "size")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{str(exc).removeprefix('size: ')} (e.g. 24GiB, 512MiB, 2e10)"
        ) from None


def dtype(text: str) -> str:
    return _checked(parse_dtype, "dtype: ", text)


def dtype_or_auto(text: str) -> str:
    return "auto" if text.strip().lower() == "auto" else dtype(text)


def context(text: str) -> int:
    return _checked(parse_context, "context: ", text)


def device(text: str) -> str:
    # Checked now, so that a machine without a GPU says so before any model is loaded.
    if text.strip().lower() == "auto":
        return "auto"
    return _checked(resolve_device, "device: ", text)


def _number(text: str, ok: Callable[[float], bool], must: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{must}, got {value:g}")
    return value


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "must be in (0, 1]")


def non_negative(text: str) -> float:
    return _number(text, lambda v: not v < 0, "must not be negative")


def positive(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``), checked against this machine as it is parsed."""
    parser.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA if available), cpu, cuda"
    )


def add_gpu_budget(parser: argparse.ArgumentParser) -> None:
    """``--gpu-budget SIZE`` (default ``None``: the free memory)."""
    parser.add_argument(
        "--gpu-budget",
        type=size,
        metavar="SIZE",
        help="GPU memory the process may use in all, e.g. 20GiB (default: the free memory)",
    )


def add_kv_dtype(parser: argparse.ArgumentParser, what: str = "the cache holds") -> None:
    """``--kv-dtype {exact,int8}`` (default ``exact``)."""
    parser.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="exact",
        help=f"how {what} keys and values: exact (default: as the model computes them) or "
        "int8 (opt-in, lossy: 8-bit with a scale per 32 values, about half the bytes of "
        "bf16; README's '8-bit KV cache' gives its measured loss)",
    )


def is_smollm2(name: str, spread: str | None = None) -> bool:
    """Whether ``--model`` names the bundled SmolLM2-135M-Instruct (``smollm2``).

    Raises:
        ValueError: it does, and ``spread`` (``distributed.placement``'s description) says the
            model is to span several GPUs.
    """
    smollm2 = name.strip().lower() == "smollm2"
    if smollm2 and spread is not None:
        raise ValueError("gpus: SmolLM2-135M runs on one device; give --model a folder or Hub id")
    return smollm2


def load_pretrained(
    name: str, dtype: Any, placement: dict[str, Any], gguf_file: str | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hub id, a local folder, or a GGUF file (a path to one, or
    ``gguf_file`` inside ``name``); the model in eval mode.

    ``placement``: ``from_pretrained``'s placing keywords (``device_map``, ...); ``kwargs``: the
    model's other keywords (``attn_implementation``, ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    where, files = name, {}
    if path.is_file() and path.suffix == ".gguf":
        where, files = str(path.parent), {"gguf_file": path.name}
    elif gguf_file is not None:
        files = {"gguf_file": gguf_file}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **files, **kwargs, **placement)
    model.eval()
    return model, AutoTokenizer.from_pretrained(where, **files)
