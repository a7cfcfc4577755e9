"""The ``_core`` boundary on CUDA tensors (issue 7, B1/B2/B7/B10): outputs with mismatched
strides are written with their own, tensors on another device, grad-requiring tensors,
wrapping head ranges and kernel size limits raise before any launch.

Each test runs under a watchdog: a hang dumps every thread's stack and fails the run.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest
import torch

from headinfer import HeadInferError, _core

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def store_with(hkv: int, d: int, tokens: int, **kw: int) -> tuple[_core.KVStore, torch.Tensor]:
    store = _core.KVStore(1, hkv, d, "float32", block_size=32, device=0, max_len=1024, **kw)
    k = torch.randn(hkv, tokens, d, device=DEV)
    store.append(0, k, k.clone(), stream=stream())
    return store, k


def test_gather_value_out_with_other_strides_is_written_with_its_own() -> None:
    # Before: the copy-engine path wrote value_out with key_out's strides (out of bounds).
    # (More layouts, and nothing written outside: test_share_gpu.py's B10 test.)
    store, k = store_with(2, 64, 100, device_budget=1 << 20)
    ko = torch.empty(2, 100, 64, device=DEV)
    vo = torch.empty(100, 2, 64, device=DEV).transpose(0, 1)  # s1 = 128, not 64: the kernel
    vo2 = torch.empty(2, 200, 64, device=DEV)[:, :100]  # s0 = 200 * 64, s1 = 64: copy engine
    for other in (vo, vo2, torch.empty_like(ko)):
        ko.fill_(float("nan"))
        other.fill_(float("nan"))
        store.gather(0, 0, 2, 0, 100, ko, other, stream())
        torch.cuda.synchronize()
        assert torch.equal(ko, k) and torch.equal(other, k)


def test_gather_head_range_cannot_wrap_on_cuda() -> None:
    store, _ = store_with(2, 64, 10)
    out = torch.empty(1, 0, 64, device=DEV)
    for head_start in (2, 2**63, 2**64 - 1):
        with pytest.raises(ValueError, match=r"^num_heads: "):
            store.gather(0, head_start, 1, 0, 0, out, out.clone(), stream())


def test_grad_checks_on_cuda() -> None:
    q = torch.randn(4, 3, 64, device=DEV, requires_grad=True)
    k = torch.randn(2, 3, 64, device=DEV)
    with pytest.raises(HeadInferError, match=r"^query: .*requires grad"):
        _core.attention(q, k, k, torch.empty(4, 3, 64, device=DEV), 0.1, stream=stream())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device_are_refused() -> None:
    store, _ = store_with(2, 64, 10)
    other = torch.randn(2, 5, 64, device="cuda:1")
    with pytest.raises(ValueError, match=r"^key: is on cuda:1"):
        store.append(0, other, other.clone(), stream=stream())
    assert store.seq_len(0) == 10


def test_kernel_grid_limits_raise_value_error() -> None:
    # group * q_len / 8 row groups above the grid's 65535: a clear error, not a launch failure.
    hkv, g, d, lq = 1, 8, 64, 65536
    q = torch.empty(hkv * g, lq, d, device=DEV)
    k = torch.randn(hkv, lq, d, device=DEV)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match=r"^query: row groups per kv head"):
        _core.attention(q, k, k, out, 0.1, stream=stream())


def test_store_max_len_beyond_kernel_limits() -> None:
    with pytest.raises(ValueError, match=r"^max_len: "):
        _core.KVStore(1, 2, 64, "float32", block_size=1, device=0, max_len=2**31)
