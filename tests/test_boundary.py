"""The ``_core`` boundary against hostile arguments: read-only and aliased outputs, tensors that
require grad, sizes whose arithmetic overflows, and storage swapped by another thread mid-call.

Anything that used to kill the interpreter runs in a subprocess, so a crash fails the test
instead of ending the session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _reference import reference
from _tiny import prompt, tiny_model

import headinfer
from headinfer import HeadInferError, _core

RO_ERROR = "is read-only memory"


def run_isolated(code: str, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter; fails the test on a crash, a non-zero exit or a hang.

    A hang fails with its stacks: at three quarters of ``timeout`` the child's faulthandler
    prints every thread's Python stack (from a thread of its own, so even a deadlock that holds
    the GIL prints), and at ``timeout`` the native stacks of every thread are taken with gdb
    where it is installed, before the child is killed.
    """
    # On the line of the opening quotes, so that the stacks' line numbers are the code's.
    code = textwrap.dedent(code)
    watchdog = f"import faulthandler; faulthandler.dump_traceback_later({0.75 * timeout})"
    proc = subprocess.Popen(
        [sys.executable, "-c", watchdog + ("" if code.startswith("\n") else "\n") + code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        native = native_stacks(proc.pid)
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"subprocess hung past {timeout} s\nstdout: {stdout[-2000:]}\n"
            f"stderr (Python stacks): {stderr[-8000:]}\nnative stacks: {native[-12000:]}"
        )
    assert proc.returncode == 0, (
        f"subprocess exited with {proc.returncode} (negative: killed by that signal)\n"
        f"stdout: {stdout[-2000:]}\nstderr: {stderr[-4000:]}"
    )
    return stdout


def native_stacks(pid: int) -> str:
    """Every thread's native stack in process ``pid`` (gdb), or why there are none."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb is not installed)"
    try:
        done = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "(gdb timed out)"
    return done.stdout + done.stderr


def read_only_memmap(tmp_path: Path, shape: tuple[int, ...]) -> np.memmap:
    path = tmp_path / "ro.bin"
    np.zeros(shape, np.float32).tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=shape)


# --- B1: outputs that cannot be written ------------------------------------------------------


def test_read_only_outputs_raise_instead_of_crashing(tmp_path: Path) -> None:
    path = tmp_path / "ro.bin"
    np.zeros((2, 3, 16), np.float32).tofile(path)
    out = run_isolated(
        f"""
        import warnings
        import numpy as np, torch
        from headinfer import _core

        def ro_numpy():  # numpy marks it READ_ONLY in its DLPack export
            return np.memmap({str(path)!r}, dtype=np.float32, mode="r", shape=(2, 3, 16))

        def ro_torch():  # torch has no read-only mark: only the pages say so
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "The given NumPy array is not writable"
                return torch.from_numpy(ro_numpy())

        q, k, v = (torch.randn(2, 3, 16) for _ in range(3))
        store = _core.KVStore(1, 2, 16, "float32")
        store.append(0, k, v)
        for make in (ro_numpy, ro_torch):
            calls = {{
                "attention": lambda: _core.attention(q, k, v, make(), 0.3),
                "attend": lambda: store.attend(0, q, make(), 0.3),
                "read key_out": lambda: store.read(0, 0, 3, make(), torch.empty(2, 3, 16)),
                "read value_out": lambda: store.read(0, 0, 3, torch.empty(2, 3, 16), make()),
            }}
            for name, call in calls.items():
                try:
                    call()
                    print(name, make.__name__, "accepted")
                except ValueError as e:
                    print(name, make.__name__, "ValueError", e)
        """
    )
    lines = out.strip().splitlines()
    assert len(lines) == 8, out
    for line in lines:
        assert "ValueError" in line and RO_ERROR in line, line
        arg = "value_out" if "value_out" in line.split(" ValueError")[0] else None
        if arg:
            assert f"ValueError {arg}: " in line, line
    assert sum("ValueError out: " in line for line in lines) == 4
    assert sum("ValueError key_out: " in line for line in lines) == 2


def test_writable_memmap_output_still_works(tmp_path: Path) -> None:
    # The file starts as NaN, so an op that writes nothing (or not everything) cannot pass;
    # the values are read back from the file, through a fresh mapping.
    path = tmp_path / "rw.bin"
    np.full((2, 3, 16), np.nan, np.float32).tofile(path)
    out = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r+", shape=(2, 3, 16)))
    q, k, v = (torch.randn(2, 3, 16) for _ in range(3))
    ref = torch.empty(2, 3, 16)
    _core.attention(q, k, v, ref, 0.3)
    _core.attention(q, k, v, out, 0.3)
    assert not ref.isnan().any()
    assert torch.equal(out, ref)
    del out
    written = torch.from_numpy(np.fromfile(path, np.float32).reshape(2, 3, 16))
    assert torch.equal(written, ref)


def test_outputs_may_not_alias_inputs_or_each_other() -> None:
    q, k, v = (torch.randn(2, 3, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"^out: must not share memory with the inputs"):
        _core.attention(q, k, v, k, 0.3)
    with pytest.raises(ValueError, match=r"^out: output strides .* overlap"):
        _core.attention(q, k, v, torch.empty(1, 3, 16).expand(2, 3, 16), 0.3)
    store = _core.KVStore(1, 2, 16, "float32")
    store.append(0, k, v)
    both = torch.empty(2, 3, 32)
    with pytest.raises(ValueError, match=r"^value_out: must not share memory with key_out"):
        store.read(0, 0, 3, both[..., :16], both[..., 8:24])


def test_negated_views_are_refused() -> None:
    # The C exchange path exports a lazily negated view without its negation: the op read
    # the keys un-negated and gave a silently wrong result.
    q, k, v = (torch.randn(2, 3, 16) for _ in range(3))
    with pytest.raises(TypeError, match=r"^key: .*negated.*resolve_neg"):
        _core.attention(q, torch._neg_view(k), v, torch.empty(2, 3, 16), 0.3)


def test_flipped_views_are_refused() -> None:
    q, k, v = (torch.randn(2, 3, 16) for _ in range(3))
    flipped = np.ascontiguousarray(k.numpy())[::-1]
    with pytest.raises(ValueError, match=r"^key: negative stride"):
        _core.attention(q, flipped, v, torch.empty(2, 3, 16), 0.3)


def test_strides_never_stepped_are_not_judged() -> None:
    # Found by the property tests: numpy exports an empty array with every stride 0, which
    # was refused as "the last dimension must have stride 1" (torch's empty tensor passed); a
    # view flipped over a dimension of one element was refused as a negative stride.
    q, k, v = (torch.randn(1, 3, 16) for _ in range(3))
    empty = np.empty((1, 0, 16), np.float32)
    _core.attention(empty, k, v, np.empty((1, 0, 16), np.float32), 0.3)
    out = np.full((1, 3, 16), np.nan, np.float32)[::-1]  # stride -48 over one element
    _core.attention(q, k, v, out, 0.3)
    ref = torch.empty(1, 3, 16)
    _core.attention(q, k, v, ref, 0.3)
    assert torch.equal(torch.from_numpy(out.copy()), ref)
    # One key whose (never stepped) row stride is 0: the CPU kernel asserted rows a row apart
    # and panicked (PanicException, a BaseException).
    q, v = torch.randn(2, 1, 16), torch.randn(1, 1, 16)
    k = torch.randn(1, 1, 16).as_strided((1, 1, 16), (16, 0, 1))
    got, want = torch.empty(2, 1, 16), torch.empty(2, 1, 16)
    _core.attention(q, k, v, got, 0.3)
    _core.attention(q, k.contiguous(), v, want, 0.3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows", ["repeated", "overlapping"])
@pytest.mark.parametrize("q_len", [1, 40])
def test_keys_and_values_whose_rows_are_closer_than_head_dim_are_read(
    rows: str, q_len: int
) -> None:
    # Found by the storage-swap test (a `resize_` seen half done): key and value views whose
    # rows repeat (stride 0 over the sequence, `expand`) or overlap (a row stride below
    # head_dim, `as_strided`) are legal inputs, and the CPU kernel's entry check asserted rows
    # at least a row apart: PanicException, a BaseException, out of `_core.attention` (the
    # store copies rows on append, so `KVStore.attend` never reads them so; checked too).
    h, length, d = 2, 48, 16
    base = torch.randn(h, length * d)
    if rows == "repeated":
        k = base[:, :d].reshape(h, 1, d).expand(h, length, d)
        v = base[:, d : 2 * d].reshape(h, 1, d).expand(h, length, d)
    else:
        k = base.as_strided((h, length, d), (length * d, d // 2, 1))
        v = base.as_strided((h, length, d), (length * d, d // 2, 1), storage_offset=3)
    q = torch.randn(2 * h, q_len, d)
    got, want = torch.empty(2 * h, q_len, d), torch.empty(2 * h, q_len, d)
    _core.attention(q, k, v, got, 0.25)
    _core.attention(q, k.contiguous(), v.contiguous(), want, 0.25)
    assert torch.equal(got, want)
    err = (got.double() - reference(q, k, v, 0.25)).abs().max().item()
    assert err < 1e-5, err
    store = _core.KVStore(1, h, d, "float32")
    store.append(0, k, v)
    from_store = torch.empty(2 * h, q_len, d)
    store.attend(0, q, from_store, 0.25)
    assert (from_store - got).abs().max().item() < 1e-5


# --- B2: gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["query", "key", "value", "out"])
def test_attention_refuses_tensors_that_require_grad(which: str) -> None:
    args = {name: torch.randn(2, 3, 16) for name in ("query", "key", "value", "out")}
    args[which].requires_grad_(True)
    with pytest.raises(HeadInferError, match=rf"^{which}: .*requires grad.*torch.no_grad"):
        _core.attention(args["query"], args["key"], args["value"], args["out"], 0.3)


def test_store_refuses_tensors_that_require_grad() -> None:
    store = _core.KVStore(1, 2, 16, "float32")
    k = torch.randn(2, 3, 16, requires_grad=True)
    with pytest.raises(HeadInferError, match=r"^key: .*requires grad"):
        store.append(0, k, k.detach())
    store.append(0, k.detach(), k.detach())
    q = torch.randn(2, 1, 16, requires_grad=True)
    with pytest.raises(HeadInferError, match=r"^query: .*requires grad"):
        store.attend(0, q, torch.empty(2, 1, 16), 0.3)
    assert store.seq_len(0) == 3


def test_patched_forward_with_grad_raises_and_no_grad_works() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    ids = prompt(20)
    with torch.enable_grad(), pytest.raises(HeadInferError, match=r"requires grad.*no_grad"):
        model(ids)
    with torch.no_grad():
        model(ids)
    with torch.inference_mode():
        model(ids)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 23)


# --- B7: sizes whose arithmetic overflows ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"block_size": 2**62}, "block_size"),
        ({"block_size": 2**40, "head_dim": 2**30}, "block_size"),
        ({"num_kv_heads": 2**62}, "num_kv_heads"),
        ({"num_layers": 2**62}, "num_kv_heads"),
        ({"device": 0, "max_len": 2**62}, "max_len"),
        ({"device": 0, "max_len": 2**40}, "max_len"),
    ],
)
def test_store_sizes_that_overflow_raise_value_error(kwargs: dict[str, int], arg: str) -> None:
    args = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32"}
    args.update(kwargs)
    # Before: PanicException (a BaseException) or an abort on allocation.
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        _core.KVStore(**args)  # type: ignore[arg-type]


def test_store_bookkeeping_beyond_host_memory() -> None:
    with pytest.raises(headinfer.OutOfHostMemoryError, match="block lists"):
        _core.KVStore(2**20, 2**24, 16, "float32", block_size=1)


def test_cache_with_huge_block_size_raises_value_error() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^block_size: "):
        headinfer.HeadInferCache(model, block_size=2**62)


def test_gather_head_range_cannot_wrap() -> None:
    # A CPU store has no gather: it refuses by name before any head arithmetic. (The CUDA
    # store's range check: tests/gpu/test_boundary_gpu.py.)
    store = _core.KVStore(1, 2, 16, "float32")
    out = torch.empty(1, 0, 16)
    with pytest.raises(TypeError, match=r"^key_out: gather copies on the GPU"):
        store.gather(0, 2**64 - 1, 1, 0, 0, out, out.clone())


# --- B8: storage swapped under the op --------------------------------------------------------


def test_storage_swapped_by_another_thread_does_not_crash() -> None:
    # Another thread swaps the storage of an argument (set_) or resizes it while the op runs
    # with the GIL released. The op must keep the memory it reads and writes alive: it may
    # see either storage and may raise, but must not crash. Before: 6 of 6 runs segfaulted.
    # Each kind of churn runs for 0.4 s and on until a call has succeeded and the other thread
    # has swapped at least once (on a loaded machine one `read` call can take seconds), 20 s
    # at most; run_isolated's watchdog prints every thread's stack should anything hang. It
    # hung in 1 of 4 full runs: `_core.attention` read a value tensor mid-`resize_` (shape
    # and strides half updated: rows closer than head_dim), its kernel panicked on those rows
    # (test_keys_and_values_whose_rows_are_closer_than_head_dim_are_read), and the churn
    # thread, never stopped, kept the interpreter alive.
    out = run_isolated(
        """
        import threading, time, torch
        from headinfer import _core

        hq, hk, lq, lk, d = 8, 8, 4, 1 << 15, 128
        q, k, v = torch.randn(hq, lq, d), torch.randn(hk, lk, d), torch.randn(hk, lk, d)
        o = torch.empty(hq, lq, d)
        store = _core.KVStore(1, hk, d, "float32")
        store.append(0, k, v)
        ko, vo = torch.empty(hk, lk, d), torch.empty(hk, lk, d)
        ops = {
            "attention": lambda: _core.attention(q, k, v, o, 0.1),
            "attend": lambda: store.attend(0, q, o, 0.1),
            "read": lambda: store.read(0, 0, lk, ko, vo),
        }
        targets = {"attention": [k, v, q, o], "attend": [q, o], "read": [ko, vo]}
        for name, op in ops.items():
            for t in targets[name]:
                for mode in ("set", "resize"):
                    shape, stop, swaps = tuple(t.shape), threading.Event(), [0]

                    def churn(t=t, shape=shape, mode=mode, stop=stop, swaps=swaps):
                        while not stop.is_set():
                            if mode == "set":
                                t.set_(torch.empty(shape))
                            else:
                                t.resize_(0)
                                t.resize_(shape)
                            swaps[0] += 1

                    # Stopped whatever the op raises: a churn thread left running (it is
                    # not a daemon) kept the interpreter from exiting, and an op's panic
                    # read as a hang until the timeout.
                    th = threading.Thread(target=churn)
                    th.start()
                    try:
                        start, calls = time.monotonic(), 0
                        while time.monotonic() - start < 20 and (
                            time.monotonic() - start < 0.4 or not calls or not swaps[0]
                        ):
                            try:
                                op()
                                calls += 1
                            except (ValueError, TypeError):
                                pass  # a shape seen mid-resize, a storage swapped mid-import
                    finally:
                        stop.set()
                        th.join()
                    print(name, mode, calls, swaps[0], flush=True)
        """,
        timeout=300,
    )
    lines = out.strip().splitlines()
    assert len(lines) == 16, out
    # Every op ran to completion under every kind of churn (the churn must not simply make
    # every call raise: then nothing would have been read or written while it ran), and the
    # other thread did swap or resize meanwhile.
    for line in lines:
        name, mode, calls, swaps = line.split()
        assert int(calls) > 0, f"{name} never succeeded while another thread did {mode}_"
        assert int(swaps) > 0, f"the other thread never ran {mode}_ while {name} was called"
