"""Tiny random models of every supported family, built from configs alone (no download): what
``headinfer check``'s self-test runs, and the tests' models (``tests/_tiny.py``).

Each case is a 3-layer, hidden-64 config with 4 query heads over 2 kv heads that exercises what
is special in its family (windows of 32-64 tokens that a 300-token prompt crosses, soft-capping,
q/k norms, MoE feed-forwards, RoPE variants, layers without RoPE, sink logits). A family that
the installed transformers lacks is reported by ``have``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = [
    "CASES",
    "FAMILIES",
    "IMAGE_TOKEN",
    "MULTIMODAL",
    "PROMPT_LEN",
    "VOCAB",
    "float64_copy",
    "have",
    "prompt",
    "sharpen",
    "tiny_config",
    "tiny_model",
]

VOCAB = 128
PROMPT_LEN = 300

_COMMON: dict[str, Any] = dict(
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

_SLIDING_MIDDLE_FULL = ["sliding_attention", "full_attention", "sliding_attention"]
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

#: Test case -> (model_type, config overrides). The case name is the family unless it is a
#: variant worth its own test (Llama-3.1 RoPE scaling, Mistral-NeMo's head_dim).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    "mistral": ("mistral", dict(sliding_window=64)),
    # Mistral-NeMo: head_dim 32 with 4 heads of a 64-wide model (q projects to 128).
    "mistral_nemo": ("mistral", dict(head_dim=32, sliding_window=None)),
    "mixtral": ("mixtral", dict(sliding_window=64, num_local_experts=4, num_experts_per_tok=2)),
    # Layers >= max_window_layers slide: layer 0 full, layers 1-2 with a 48-token window.
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=48, max_window_layers=1)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=4, shared_expert_intermediate_size=48, decoder_sparse_step=1, **_MOE),
    ),
    "qwen3": (
        "qwen3",
        dict(head_dim=16, use_sliding_window=True, sliding_window=48, max_window_layers=1),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(head_dim=16, use_sliding_window=True, sliding_window=64, num_experts=4, **_MOE),
    ),
    "gemma2": (
        "gemma2",
        dict(
            head_dim=16,
            sliding_window=40,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
        ),
    ),
    # The text model: sliding layers with RoPE base 10K, the full one with 1M.
    "gemma3": (
        "gemma3_text",
        dict(
            head_dim=16,
            sliding_window=40,
            query_pre_attn_scalar=24,
            layer_types=_SLIDING_MIDDLE_FULL,
        ),
    ),
    # LongRoPE as in Phi-3-128k / Phi-4-mini: long factors past 64 positions.
    "phi3": (
        "phi3",
        dict(
            sliding_window=64,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                factor=8.0,
                short_factor=[1.0] * 8,
                long_factor=[4.0] * 8,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", dict(sliding_window=48, layer_types=_SLIDING_MIDDLE_FULL)),
    "granite": (
        "granite",
        dict(
            attention_multiplier=0.2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=4.0,
        ),
    ),
    "cohere2": ("cohere2", dict(sliding_window=48, layer_types=_SLIDING_MIDDLE_FULL)),
    # Layer 1 has no RoPE and slides (as SmolLM3 builds layer_types from no_rope_layers).
    "smollm3": (
        "smollm3",
        dict(no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=48),
    ),
    "ministral": (
        "ministral",
        dict(head_dim=16, sliding_window=48, layer_types=_SLIDING_MIDDLE_FULL),
    ),
    "glm4": ("glm4", dict(head_dim=16)),
    "exaone4": ("exaone4", dict(sliding_window=48, layer_types=_SLIDING_MIDDLE_FULL)),
    "gpt_oss": (
        "gpt_oss",
        dict(
            head_dim=16,
            sliding_window=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            # YaRN as gpt-oss has it, scaled to the tiny context.
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                original_max_position_embeddings=128,
                beta_fast=32.0,
                beta_slow=1.0,
            ),
        ),
    ),
}

#: Every case that patch() runs.
FAMILIES = tuple(CASES)


#: Multimodal wrappers (image-text models) whose text tower is a supported family; text
#: prompts only.
MULTIMODAL = ("gemma3_image_text", "qwen2_vl")

#: Token id standing for an image in the tiny multimodal configs (inside the tiny vocabulary).
IMAGE_TOKEN = 5

_MULTIMODAL_TYPES = {"gemma3_image_text": "gemma3", "qwen2_vl": "qwen2_vl"}


def have(case: str) -> bool:
    """Whether the installed transformers has the model type of ``case``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = _MULTIMODAL_TYPES.get(case) or CASES[case][0]
    return model_type in CONFIG_MAPPING


def tiny_config(case: str, **overrides: object) -> Any:
    """The tiny config of a case (see ``CASES``, ``MULTIMODAL``), with ``overrides`` on top
    (a multimodal case's go to its text tower)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if case in _MULTIMODAL_TYPES:
        return _multimodal_config(case, **overrides)
    model_type, specific = CASES[case]
    return CONFIG_MAPPING[model_type](**dict(_COMMON, **dict(specific, **overrides)))


def _text_kwargs(case: str, **overrides: object) -> dict[str, Any]:
    kw = dict(_COMMON, **dict(CASES[case][1], **overrides))
    kw.pop("attn_implementation")
    return kw


def _multimodal_config(name: str, **overrides: object) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING as _MAPPING

    CONFIG_MAPPING: Any = _MAPPING  # each config class takes its own keywords

    if name == "gemma3_image_text":
        return CONFIG_MAPPING["gemma3"](
            text_config=_text_kwargs("gemma3", **overrides),
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
    # M-RoPE sections of the tiny head_dim 16 (8 rotary pairs).
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    text = dict(head_dim=16, rope_parameters=rope, use_sliding_window=False)
    return CONFIG_MAPPING["qwen2_vl"](
        text_config=_text_kwargs("qwen2", **dict(text, **overrides)),
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


def sharpen(model: torch.nn.Module) -> None:
    """Larger-than-default q/k weights make attention peaked enough for windows to matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)


def tiny_model(
    case: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object
) -> Any:
    """A randomly initialised tiny model of ``case`` with eager attention, in eval mode (a
    multimodal case: the image-text model, with a one-layer vision tower).

    Raises:
        ValueError: the installed transformers has no model of ``case``'s family.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, __version__

    if not have(case):
        raise ValueError(f"case: transformers {__version__} has no {case} model")
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if case in _MULTIMODAL_TYPES else AutoModelForCausalLM
    model = auto.from_config(tiny_config(case, **overrides))
    sharpen(model)
    return model.to(dtype).eval()


def prompt(length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    """``[1, length]`` random token ids (avoiding the special ids 0-2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)


def float64_copy(model: Any) -> Any:
    """A copy of ``model`` in float64 on the CPU: the reference that errors in a low precision
    are measured against. MoE experts run their plain loop there (torch's grouped GEMM takes no
    float64 on some versions), so the reference is the same function in float64."""
    exact = copy.deepcopy(model).to("cpu", torch.float64)
    if hasattr(exact, "set_experts_implementation") and getattr(
        exact.config, "_experts_implementation", None
    ) not in (None, "eager"):
        exact.set_experts_implementation("eager")
    return exact
