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
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import headinfer

# The cases are the library's (``headinfer check`` runs them too); re-exported for the tests.
from headinfer.tiny import _COMMON, CASES, have, prompt, tiny_config
from headinfer.tiny import FAMILIES as FAMILIES
from headinfer.tiny import PROMPT_LEN as PROMPT_LEN
from headinfer.tiny import VOCAB as VOCAB
from headinfer.tiny import sharpen as _sharpen


def require(case: str) -> None:
    """Skip the calling test when the installed transformers lacks ``case``'s family."""
    if not have(case):
        pytest.skip(f"transformers {transformers.__version__} has no {CASES[case][0]} model")


def tiny_model(
    case: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """A randomly initialised tiny model of ``case`` with eager attention, in eval mode."""
    require(case)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(case, **overrides))
    _sharpen(model)
    return model.to(dtype).eval()


def _text_kwargs(case: str, **overrides: object) -> dict[str, Any]:
    kw = dict(_COMMON, **dict(CASES[case][1], **overrides))
    kw.pop("attn_implementation")
    return kw


#: Multimodal wrappers (image-text models) whose text tower is a supported family.
MULTIMODAL = ("gemma3_image_text", "qwen2_vl")

#: Token id standing for an image in the tiny multimodal configs (inside the tiny vocabulary).
IMAGE_TOKEN = 5


def tiny_multimodal(name: str, seed: int = 0) -> PreTrainedModel:
    """A tiny image-text model (one-layer vision tower) around a tiny text model, eager."""
    if name == "gemma3_image_text":
        if "gemma3" not in CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers.__version__} has no gemma3 model")
        config = CONFIG_MAPPING["gemma3"](
            text_config=_text_kwargs("gemma3"),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_id=IMAGE_TOKEN,
            attn_implementation="eager",
        )
    elif name == "qwen2_vl":
        if "qwen2_vl" not in CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers.__version__} has no qwen2_vl model")
        # M-RoPE sections of the tiny head_dim 16 (8 rotary pairs).
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        config = CONFIG_MAPPING["qwen2_vl"](
            text_config=_text_kwargs(
                "qwen2", head_dim=16, rope_parameters=rope, use_sliding_window=False
            ),
            vision_config=dict(
                depth=1,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
            ),
            image_token_id=IMAGE_TOKEN,
            attn_implementation="eager",
        )
    else:
        raise ValueError(name)
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    _sharpen(model)
    return model.eval()


def twin(model: PreTrainedModel) -> PreTrainedModel:
    """An independent, unpatched copy with the same weights: the eager reference."""
    # A deep copy of a patched model is patched too (its wrappers follow the copy).
    return headinfer.unpatch(copy.deepcopy(model))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max())


def assert_error_within_torch_own(model: PreTrainedModel) -> None:
    """As flash-attention's tests do: ``model`` (unpatched, in a low precision; patched here)
    has an error against a float64 run of its weights at most twice eager attention's own."""
    eager = twin(model)
    exact = twin(model).to(torch.float64)
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
