"""What the property tests share: example counts, tensors laid out in every way the boundary
accepts or must refuse, and the check that an error names the argument it is about.

A generated argument is a ``Arg``: the tensor (or array) passed, its values as a plain
contiguous tensor (what the op should see), and what the boundary must do with it:
``"ok"`` (accept and compute with it), ``"refuse"`` (a ``ValueError``/``TypeError``, or
``HeadInferError`` for a tensor that requires grad, naming the argument) or ``"either"`` (a
layout the contract neither promises nor forbids: the result is right, or the argument is
named in a refusal).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from headinfer import HeadInferError


def examples(n: int) -> int:
    """``n`` examples, times ``HEADINFER_EXAMPLES`` (default 1) for a longer hunt."""
    return n * int(os.environ.get("HEADINFER_EXAMPLES", "1"))


DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Error of the op against a float64 reference of the same (rounded) inputs, relative to the
#: largest value: f32 accumulation, then rounding the output to the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

#: Layouts of an input tensor, and what the boundary must do with each.
INPUT_LAYOUTS = {
    "contiguous": "ok",
    "transposed": "ok",  # [L, H, D] storage seen as [H, L, D], as the models make q/k/v
    "sliced": "ok",  # every other row of a larger tensor (non-contiguous, gaps)
    "offset": "ok",  # a view starting inside a larger storage
    "padded": "ok",  # rows wider than head_dim (the last dimension a slice of a wider one)
    "numpy": "ok",  # a numpy array through DLPack
    "size1_huge_stride": "ok",  # dims of size 1 with an absurd stride (never stepped)
    "broadcast": "either",  # stride 0 over heads (expand): aliasing rows in an input
    "broadcast_rows": "ok",  # stride 0 over the sequence (expand): every row the first
    "overlapping_rows": "ok",  # rows half a row apart (as_strided): each overlaps the next
    "read_only_numpy": "ok",  # inputs may be read-only
    "last_stride": "refuse",  # head_dim not of stride 1
    "flipped": "refuse",  # a negative stride (numpy)
    "negated": "refuse",  # torch's lazily negated view
    "requires_grad": "refuse",
    "meta": "refuse",  # no data at all
}

#: The same for an output: aliasing and read-only memory must be refused.
OUTPUT_LAYOUTS = {
    "contiguous": "ok",
    "transposed": "ok",
    "sliced": "ok",
    "offset": "ok",
    "padded": "ok",
    "numpy": "ok",
    "size1_huge_stride": "ok",
    "broadcast": "refuse",  # rows that overlap each other
    "broadcast_rows": "refuse",
    "overlapping_rows": "refuse",
    "read_only_numpy": "refuse",
    "last_stride": "refuse",
    "flipped": "refuse",
    "negated": "refuse",
    "requires_grad": "refuse",
    "meta": "refuse",
}


@dataclass
class Arg:
    name: str
    passed: Any
    values: torch.Tensor
    verdict: str  # "ok", "refuse" or "either"
    layout: str

    def result(self) -> torch.Tensor:
        """What was written into an output, as a torch tensor."""
        if isinstance(self.passed, np.ndarray):
            return torch.from_numpy(np.array(self.passed))
        return self.passed.detach()


def _lay_out(base: torch.Tensor, layout: str) -> tuple[Any, torch.Tensor]:
    """``base`` ``[H, L, D]`` (contiguous) in ``layout``: ``(passed, values it holds)``."""
    h, length, d = base.shape
    dtype = base.dtype
    if layout == "contiguous":
        t = base.clone()
    elif layout == "transposed":
        t = base.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":
        big = torch.empty(h, 2 * length + 1, d, dtype=dtype)
        big.fill_(float("nan"))
        t = big[:, 1::2]
        t.copy_(base)
    elif layout == "offset":
        flat = torch.full((7 + base.numel(),), float("nan"), dtype=dtype)
        t = flat[7:].view(h, length, d)
        t.copy_(base)
    elif layout == "padded":
        big = torch.full((h, length, d + 5), float("nan"), dtype=dtype)
        t = big[..., 2 : 2 + d]
        t.copy_(base)
    elif layout in ("numpy", "read_only_numpy", "flipped"):
        if dtype != torch.float32:
            # numpy has no bfloat16: the layout stands as torch's own (contiguous) then.
            return base.clone(), base
        arr = base.numpy().copy()
        if layout == "flipped":
            arr = np.ascontiguousarray(arr[::-1])[::-1]
        if layout == "read_only_numpy":
            arr.flags.writeable = False
        return arr, base
    elif layout == "size1_huge_stride":
        t = base.clone()
        strides = list(t.stride())
        for i, n in enumerate(t.shape):
            if n == 1:
                strides[i] = 1 << 40
        t = t.as_strided(t.shape, strides)
    elif layout == "broadcast":
        t = base[:1].expand(h, length, d)
        return t, base[:1].expand(h, length, d).clone()
    elif layout == "broadcast_rows":
        t = base[:, :1].expand(h, length, d)
        return t, t.clone()
    elif layout == "overlapping_rows":
        t = base.as_strided((h, length, d), (length * d, max(d // 2, 1), 1))
        return t, t.clone()
    elif layout == "last_stride":
        big = torch.empty(h, length, 2 * d, dtype=dtype)
        t = big[..., ::2]
        t.copy_(base)
    elif layout == "negated":
        t = torch._neg_view(-base)
        if t.numel() == 0:
            return base.clone(), base
        return t, base
    elif layout == "requires_grad":
        return base.clone().requires_grad_(True), base
    elif layout == "meta":
        return torch.empty(base.shape, dtype=dtype, device="meta"), base
    else:
        raise AssertionError(layout)
    return t, base


def lay_out(name: str, base: torch.Tensor, layout: str, output: bool) -> Arg:
    """An ``Arg`` of ``base`` laid out as ``layout``. An output holds NaN wherever it is laid
    out (so a value never written shows)."""
    table = OUTPUT_LAYOUTS if output else INPUT_LAYOUTS
    if output:
        base = torch.full(base.shape, float("nan"), dtype=base.dtype)
    passed, values = _lay_out(base, layout)
    verdict = table[layout]
    # Layouts that degenerate (no numpy bfloat16, a stride on a size-1 or empty dimension):
    # the passed tensor is then a plain one.
    if layout in ("numpy", "read_only_numpy", "flipped") and not isinstance(passed, np.ndarray):
        verdict = "ok"
    if layout == "last_stride" and (base.shape[-1] == 1 or base.numel() == 0):
        verdict = "either"  # the stride of a dimension of size 1, or of nothing, is never taken
    if layout == "negated" and base.numel() == 0:
        verdict = "ok"
    if layout == "broadcast" and (base.shape[0] <= 1 or base.numel() == 0):
        verdict = "ok" if output else verdict
    if layout == "broadcast_rows" and (base.shape[1] <= 1 or base.numel() == 0):
        verdict = "ok"  # a stride over one row (or none) is never taken
    if layout == "overlapping_rows" and (
        base.shape[1] <= 1 or base.shape[2] <= 1 or not base.numel()
    ):
        verdict = "ok"  # one row (or none), or rows one element wide: nothing overlaps
    if layout == "flipped" and (base.shape[0] <= 1 or base.numel() == 0):
        verdict = "either"  # a negative stride over one element (or none) is never taken
    return Arg(name, passed, values, verdict, layout)


def layouts(output: bool) -> st.SearchStrategy[str]:
    """A layout, the plain ones about half the time."""
    table = OUTPUT_LAYOUTS if output else INPUT_LAYOUTS
    plain = st.sampled_from(["contiguous", "transposed", "sliced", "offset", "padded"])
    return st.one_of(plain, st.sampled_from(sorted(table)))


_NAMED = re.compile(r"^(?P<arg>[a-z_]+): ")
_NOTE = re.compile(r"^while processing '(?P<arg>[a-z_]+)'$")


def named(exc: BaseException) -> str | None:
    """The argument an error is about: ``"name: ..."`` as headinfer's messages start, or, for
    an argument that PyO3 could not convert (a str for an int), the note PyO3 adds to it."""
    m = _NAMED.match(str(exc))
    if m:
        return m.group("arg")
    for note in getattr(exc, "__notes__", []):
        m = _NOTE.match(note)
        if m:
            return m.group("arg")
    return None


#: Integer arguments: an int outside their C range (negative, or 2**64 and more) raises
#: Python's OverflowError from PyO3's conversion, with a note naming the argument. That is the
#: interpreter's own convention for such ints (``array("I", [-1])`` does the same), so it is
#: accepted for these arguments alone; every other refusal is a ValueError or TypeError.
INT_ARGS = {"window", "stream", "layer", "start", "end", "length"}


def check_refusal(exc: BaseException, allowed: set[str]) -> None:
    """``exc`` is a clear refusal of one of the ``allowed`` arguments."""
    arg = named(exc)
    if isinstance(exc, OverflowError) and arg in INT_ARGS:
        assert arg in allowed, f"OverflowError names {arg!r}, expected {sorted(allowed)}: {exc}"
        return
    assert isinstance(exc, (ValueError, TypeError, HeadInferError)), (
        f"{type(exc).__name__} is not a ValueError/TypeError/HeadInferError: {exc}"
    )
    assert arg in allowed, f"the error names {arg!r}, expected one of {sorted(allowed)}: {exc}"


def values(draw: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random values of ``shape`` (normal, scaled by a drawn magnitude), rounded to ``dtype``."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1.0, 0.1, 4.0]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)
