"""Property tests of the ``_core`` boundary (hypothesis): the attention op and the store's
entry points over generated arguments: shapes (empty ones too), dtypes, layouts (strided,
transposed, broadcast, flipped, negated, numpy, read-only, huge strides on size-1 dims),
tensors that require grad or have no data, and scalar arguments in and out of range.

Each example ends one of two ways: the output equals a float64 reference within the dtype's
tolerance (and nothing outside the output's view was written), or a ``ValueError`` /
``TypeError`` (``HeadInferError`` for grad) names an argument that was wrong. Which one is
predicted from what was generated: a valid call that raises fails, and so does a wrong one
that returns. A crash or a hang fails the whole run.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _props import (
    DTYPES,
    TOLERANCE,
    Arg,
    check_refusal,
    examples,
    lay_out,
    layouts,
    values,
)
from _reference import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from headinfer import _core

pytestmark = pytest.mark.filterwarnings(
    # torch.from_numpy of a read-only array, as a user would hit it
    "ignore:The given NumPy array is not writable:UserWarning"
)


def f32(x: float) -> float:
    """``x`` as the op sees it (a float32)."""
    return float(torch.tensor(x, dtype=torch.float32))


@st.composite
def scalars(draw: Any) -> tuple[dict[str, Any], set[str]]:
    """``scale``, ``softcap`` and ``window`` keywords, and the names of those out of range."""
    bad: set[str] = set()
    scale = draw(
        st.one_of(
            st.floats(0.01, 2.0),
            st.sampled_from([0.0, -0.5, float("nan"), float("inf"), -float("inf"), 1e39]),
        )
    )
    # f32 after conversion: 1e39 is inf in float32.
    if not math.isfinite(f32(scale)):
        bad.add("scale")
    softcap = draw(
        st.one_of(
            st.none(),
            st.floats(0.5, 50.0),
            st.sampled_from([0.0, -1.0, float("nan"), float("inf")]),
        )
    )
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        bad.add("softcap")
    window = draw(
        st.one_of(st.none(), st.integers(1, 64), st.sampled_from([0, -1, 2**64, 2**70, 2**63 - 1]))
    )
    if window is not None and not (1 <= window < 2**64):
        bad.add("window")
    return {"scale": scale, "softcap": softcap, "window": window}, bad


@st.composite
def attention_call(draw: Any) -> dict[str, Any]:
    """Arguments of one ``_core.attention`` call, and what it must do."""
    dtype = draw(st.sampled_from(DTYPES))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    hq = hkv * group
    d = draw(st.sampled_from([1, 3, 8, 16, 64, 80, 128]))
    lk = draw(st.integers(0, 70))
    lq = draw(st.integers(0, min(lk, 9)))
    bad: set[str] = set()
    wrong = draw(
        st.sampled_from(
            [None] * 6
            + ["heads", "too_many_queries", "value_len", "key_dim", "out_shape"]
            + ["key_dtype", "out_dtype", "f64", "sinks_len", "sinks_dtype"]
        )
    )
    kshape, vshape, oshape = [hkv, lk, d], [hkv, lk, d], [hq, lq, d]
    qshape = [hq, lq, d]
    kdtype, odtype, qdtype = dtype, dtype, dtype
    if wrong == "heads":
        qshape[0] = hq + 1 if (hq + 1) % hkv else hq + 2
        oshape[0] = qshape[0]
        bad |= {"query"} if qshape[0] % hkv else set()
    elif wrong == "too_many_queries":
        qshape[1] = oshape[1] = lk + 1
        bad.add("query")
    elif wrong == "value_len":
        vshape[1] = lk + 1
        bad |= {"value", "key"}
    elif wrong == "key_dim":
        kshape[2] = d + 1
        bad |= {"key", "value"}
    elif wrong == "out_shape":
        oshape[1] = lq + 1
        bad.add("out")
    elif wrong == "key_dtype":
        kdtype = next(t for t in DTYPES if t != dtype)
        bad.add("key")
    elif wrong == "out_dtype":
        odtype = next(t for t in DTYPES if t != dtype)
        bad.add("out")
    elif wrong == "f64":
        qdtype = torch.float64
        bad.add("query")
    q = values(draw, tuple(qshape), qdtype)
    k = values(draw, tuple(kshape), kdtype)
    v = values(draw, tuple(vshape), dtype)
    args = [
        lay_out("query", q, draw(layouts(False)), output=False),
        lay_out("key", k, draw(layouts(False)), output=False),
        lay_out("value", v, draw(layouts(False)), output=False),
        lay_out("out", torch.empty(oshape, dtype=odtype), draw(layouts(True)), output=True),
    ]
    sinks = None
    if draw(st.booleans()):
        n = qshape[0] + (1 if wrong == "sinks_len" else 0)
        sinks = values(draw, (n,), torch.float64 if wrong == "sinks_dtype" else torch.float32)
        if wrong in ("sinks_len", "sinks_dtype"):
            bad.add("sinks")
    kw, bad_scalars = draw(scalars())
    return {"args": args, "sinks": sinks, "kw": kw, "bad": bad | bad_scalars}


def run_and_judge(call: Any, args: list[Arg], bad: set[str], out: Arg, expect: Any) -> None:
    """Runs ``call``; judges the outcome against what the arguments predict (module doc)."""
    refuse = {a.name for a in args if a.verdict == "refuse"} | bad
    either = {a.name for a in args if a.verdict == "either"}
    try:
        try:
            call()
        except BaseException as exc:
            # A Rust panic (PyO3's PanicException, a BaseException) is a failure hypothesis
            # should shrink: raised as an AssertionError.
            if type(exc).__name__ == "PanicException":
                raise AssertionError(f"Rust panicked: {exc}") from exc
            raise
    except AssertionError:
        raise
    except Exception as exc:
        assert refuse or either, f"a valid call raised {type(exc).__name__}: {exc}"
        check_refusal(exc, refuse | either)
        return
    assert not refuse, f"accepted, but these arguments are wrong: {sorted(refuse)}"
    got = out.result()
    ref = expect()
    if ref.numel():
        vmax = max(float(ref.abs().max()), 1e-3)
        err = float((got.double() - ref).abs().max()) if got.numel() else 0.0
        assert err <= TOLERANCE[got.dtype] * vmax, f"error {err:.3g} of max |out| {vmax:.3g}"
    base = getattr(out.passed, "_base", None)
    if isinstance(base, torch.Tensor) and out.layout in ("sliced", "offset", "padded"):
        # Everything of the storage outside the view is still NaN: nothing written beside it.
        assert int(base.isnan().sum()) == base.numel() - got.numel(), "wrote outside `out`"


@settings(max_examples=examples(2000))
@given(attention_call())
def test_attention_op_equals_reference_or_names_the_argument(c: dict[str, Any]) -> None:
    q, k, v, out = c["args"]
    kw = c["kw"]

    def call() -> None:
        _core.attention(q.passed, k.passed, v.passed, out.passed, sinks=c["sinks"], **kw)

    def expect() -> torch.Tensor:
        return reference(
            q.values,
            k.values,
            v.values,
            f32(kw["scale"]),
            softcap=kw["softcap"],
            window=kw["window"],
            sinks=c["sinks"],
        )

    run_and_judge(call, c["args"], c["bad"], out, expect)


@settings(max_examples=examples(1500))
@given(st.data())
def test_store_entry_points_equal_reference_or_name_the_argument(data: st.DataObject) -> None:
    """A store with one layer of ``lk`` appended keys, and one call to ``append``, ``read`` or
    ``attend`` on it with generated arguments."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 8, 16, 64, 128]))
    block = draw(st.sampled_from([1, 3, 16]))
    lk = draw(st.integers(1, 40))
    keys, vals = values(draw, (hkv, lk, d), dtype), values(draw, (hkv, lk, d), dtype)
    op = draw(st.sampled_from(["append", "read", "attend"]))
    store = _core.KVStore(2, hkv, d, _DTYPE_NAMES[dtype], block)
    if op == "append":
        # The appended chunk in generated layouts; then read back exactly and attended over.
        n = draw(st.integers(0, 12))
        k = lay_out("key", values(draw, (hkv, n, d), dtype), draw(layouts(False)), False)
        v = lay_out("value", values(draw, (hkv, n, d), dtype), draw(layouts(False)), False)
        layer = draw(st.sampled_from([0, 1, 2, -1]))
        refuse = {a.name for a in (k, v) if a.verdict == "refuse"}
        either = {a.name for a in (k, v) if a.verdict == "either"}
        bad = set() if layer in (0, 1) else {"layer"}
        try:
            store.append(layer, k.passed, v.passed)
        except Exception as exc:
            assert refuse | either | bad, f"a valid append raised {type(exc).__name__}: {exc}"
            check_refusal(exc, refuse | either | bad)
            assert store.seq_len(0) == store.seq_len(1) == 0, "a refused append changed the store"
            return
        assert not (refuse | bad), f"accepted, but wrong: {sorted(refuse | bad)}"
        assert store.seq_len(layer) == n
        ko, vo = torch.empty(hkv, n, d, dtype=dtype), torch.empty(hkv, n, d, dtype=dtype)
        store.read(layer, 0, n, ko, vo)
        assert torch.equal(ko, k.values) and torch.equal(vo, v.values)
        return
    store.append(0, keys, vals)
    if op == "read":
        start = draw(st.integers(0, lk + 1))
        end = draw(st.integers(0, lk + 2))
        n = max(end - start, 0)
        ko = lay_out("key_out", torch.empty(hkv, n, d, dtype=dtype), draw(layouts(True)), True)
        vo = lay_out("value_out", torch.empty(hkv, n, d, dtype=dtype), draw(layouts(True)), True)
        bad = set() if start <= end <= lk else {"start", "end"}
        refuse = {a.name for a in (ko, vo) if a.verdict == "refuse"} | bad
        either = {a.name for a in (ko, vo) if a.verdict == "either"}
        try:
            store.read(0, start, end, ko.passed, vo.passed)
        except Exception as exc:
            assert refuse | either, f"a valid read raised {type(exc).__name__}: {exc}"
            check_refusal(exc, refuse | either)
            return
        assert not refuse, f"accepted, but wrong: {sorted(refuse)}"
        assert torch.equal(ko.result(), keys[:, start:end])
        assert torch.equal(vo.result(), vals[:, start:end])
        return
    lq = draw(st.integers(0, min(lk, 6)))
    q = lay_out("query", values(draw, (hq, lq, d), dtype), draw(layouts(False)), False)
    out = lay_out("out", torch.empty(hq, lq, d, dtype=dtype), draw(layouts(True)), True)
    kw, bad = draw(scalars())

    def call() -> None:
        store.attend(0, q.passed, out.passed, **kw)

    def expect() -> torch.Tensor:
        scale = f32(kw["scale"])
        return reference(q.values, keys, vals, scale, softcap=kw["softcap"], window=kw["window"])

    run_and_judge(call, [q, out], bad, out, expect)


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
