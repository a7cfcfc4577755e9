"""``benchmarks/soak.py``'s reading of a call whose two runs part: a near tie or a failure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak():
    spec = importlib.util.spec_from_file_location("soak_under_test", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _soak()


def _logits(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_equal_tokens_are_exact():
    same = [_logits([1.0, 0.0])]
    assert soak.divergence([0], [0], same, same, tol=0.05) is None


def test_greedy_flip_between_close_logits_is_a_near_tie():
    # The two runs' logits differ by 0.01 at the step where they part, and the two tokens'
    # logits are 0.005 apart: rounding decided the token.
    ref = [_logits([5.0, 1.0, 0.0]), _logits([2.0, 1.995, 0.0])]
    got = [_logits([5.0, 1.0, 0.0]), _logits([1.99, 2.0, 0.0])]
    out = soak.divergence([0, 1], [0, 0], got, ref, tol=0.05)
    assert out is not None and out["step"] == 1
    assert out["near_tie"], out
    assert abs(out["max_abs"] - 0.01) < 1e-5 and out["gap"] <= 2 * out["max_abs"]


def test_logits_apart_beyond_tolerance_are_unexplained():
    # A wrong cache moves the logits far more than rounding does.
    ref = [_logits([5.0, 1.0, 0.0])]
    got = [_logits([1.0, 5.0, 0.0])]
    out = soak.divergence([1], [0], got, ref, tol=0.05)
    assert out is not None and out["rel"] > 0.05 and not out["near_tie"], out
    assert soak.divergence([1], [0], got, ref, tol=2.0)["near_tie"]


def test_runs_of_different_lengths_are_unexplained():
    ref = [_logits([1.0, 0.0])]
    out = soak.divergence([0], [0, 1], ref, ref + ref, tol=1.0)
    assert out is not None and not out["near_tie"]


def test_a_sample_reads_unexplained_only_when_parted_and_not_a_tie():
    kw = dict(
        call=0, kind="explicit", prompt_len=1, seconds=0.0, rss=0, store_host=0, pinned=0,
        device_blocks=0, nvml=None, live_caches=1,
    )  # fmt: skip
    assert not soak.Sample(exact=True, **kw).unexplained
    assert soak.Sample(exact=False, **kw).unexplained  # an old record without the reading
    assert not soak.Sample(exact=False, parted={"near_tie": True}, **kw).unexplained
    assert soak.Sample(exact=False, parted=soak.FAILED, **kw).unexplained
