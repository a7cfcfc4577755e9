"""Tiny random models of each supported family, and helpers to compare against eager attention.

Each case is a 3-layer, hidden-64 config with 4 query heads over 2 kv heads that exercises what
is special in its family (windows of 40-64 tokens that a 300-token prompt crosses, soft-capping,
q/k norms, MoE feed-forwards, RoPE variants, layers without RoPE). A family that the installed
transformers lacks is skipped by the tests, naming the version.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers
from transformers import PreTrainedModel

import headinfer

# The cases are the library's (``headinfer check`` runs them too); re-exported for the tests.
from headinfer.tiny import CASES, float64_copy, have, prompt
from headinfer.tiny import FAMILIES as FAMILIES
from headinfer.tiny import IMAGE_TOKEN as IMAGE_TOKEN
from headinfer.tiny import MULTIMODAL as MULTIMODAL
from headinfer.tiny import PROMPT_LEN as PROMPT_LEN
from headinfer.tiny import VOCAB as VOCAB
from headinfer.tiny import tiny_config as tiny_config
from headinfer.tiny import tiny_model as _tiny_model


def require(case: str) -> None:
    """Skip the calling test when the installed transformers lacks ``case``'s family."""
    if not have(case):
        pytest.skip(f"transformers {transformers.__version__} has no {CASES[case][0]} model")


def tiny_model(
    case: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """A randomly initialised tiny model of ``case`` with eager attention, in eval mode."""
    require(case)
    return _tiny_model(case, dtype, seed, **overrides)


def tiny_multimodal(name: str, seed: int = 0) -> PreTrainedModel:
    """A tiny image-text model (one-layer vision tower) around a tiny text model, eager."""
    if not have(name):
        pytest.skip(f"transformers {transformers.__version__} has no {name} model")
    return _tiny_model(name, seed=seed)


def twin(model: PreTrainedModel) -> PreTrainedModel:
    """An independent, unpatched copy with the same weights: the eager reference."""
    # A deep copy of a patched model is patched too (its wrappers follow the copy).
    return headinfer.unpatch(copy.deepcopy(model))


def float64_twin(model: PreTrainedModel) -> PreTrainedModel:
    """``twin(model)`` in float64, on the CPU (``headinfer.tiny.float64_copy``: MoE experts in
    their plain loop): the reference flash-attention-style checks measure errors against."""
    return float64_copy(twin(model))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max())


def assert_error_within_torch_own(model: PreTrainedModel) -> None:
    """As flash-attention's tests do: ``model`` (unpatched, in a low precision; patched here)
    has an error against a float64 run of its weights at most twice eager attention's own."""
    eager = twin(model)
    exact = float64_twin(model)
    headinfer.patch(model, chunk_size=97, block_size=16)
    ids = prompt()
    with torch.no_grad():
        ref = exact(ids).logits
        ours = rel_err(model(ids).logits, ref)
        theirs = rel_err(eager(ids).logits, ref)
    assert ours <= 2 * theirs + 1e-6


def generate_scores(model: PreTrainedModel, new_tokens: int, **kw: object) -> Any:
    """Greedy ``generate`` from ``prompt()`` with the scores of every step."""
    return model.generate(
        prompt(),
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
