"""Tiny random models of each supported family, and helpers to compare against eager attention."""

from __future__ import annotations

import copy

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import headinfer

FAMILIES = ("llama", "mistral", "qwen2", "gemma2")

VOCAB = 128
PROMPT_LEN = 300

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    attn_implementation="eager",
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, **overrides: object):
    """A 3-layer, 4-query-head / 2-kv-head config of ``family`` that exercises its specifics."""
    kw = dict(_COMMON, **overrides)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "mistral":
        return MistralConfig(**dict(dict(sliding_window=64), **kw))
    if family == "qwen2":
        # Layers >= max_window_layers slide: layer 0 full, layers 1-2 with a 48-token window.
        return Qwen2Config(
            **dict(dict(use_sliding_window=True, sliding_window=48, max_window_layers=1), **kw)
        )
    if family == "gemma2":
        base = dict(
            head_dim=16,
            sliding_window=40,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
        )
        return Gemma2Config(**dict(base, **kw))
    raise ValueError(family)


_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
}


def tiny_model(
    family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object
) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` with eager attention, in eval mode."""
    torch.manual_seed(seed)
    model = _CLASSES[family](tiny_config(family, **overrides))
    # Larger-than-default weights make attention peaked enough for windows to matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.to(dtype).eval()


def twin(model: PreTrainedModel) -> PreTrainedModel:
    """An independent, unpatched copy with the same weights: the eager reference."""
    # A deep copy of a patched model is patched too (its wrappers follow the copy).
    return headinfer.unpatch(copy.deepcopy(model))


def prompt(length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    """``[1, length]`` random token ids (avoiding the special ids 0-2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max())
