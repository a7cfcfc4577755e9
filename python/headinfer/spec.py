"""What headinfer needs to know about a model's attention, read from its config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from .errors import UnsupportedModelError

__all__ = ["SUPPORTED_FAMILIES", "ModelSpec", "model_spec"]

# gpt_oss: its per-layer windows come from layer_types; its learned sinks (module.sinks) reach
# the op through the attention glue (attention.py).
SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma2", "gpt_oss")


@dataclass(frozen=True)
class ModelSpec:
    """What the store needs to know about a model, read from its config."""

    family: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    #: Per layer, the sliding window in tokens, or ``None`` for full attention.
    windows: tuple[int | None, ...]
    max_positions: int | None


def model_spec(config: PretrainedConfig) -> ModelSpec:
    """Read the attention geometry of a supported model from its config.

    Raises:
        UnsupportedModelError: ``config.model_type`` is not a supported family, or the model uses
            an attention variant headinfer does not implement (e.g. bidirectional Gemma-2).
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"model_type {family!r}", SUPPORTED_FAMILIES)
    if getattr(config, "use_bidirectional_attention", False) or not getattr(
        config, "is_causal", True
    ):
        raise UnsupportedModelError(f"bidirectional attention ({family})", SUPPORTED_FAMILIES)

    num_layers = config.num_hidden_layers
    num_q_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
    sliding_window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if family == "llama":
        windows: list[int | None] = [None] * num_layers
    elif family == "mistral" or layer_types is None:
        # Mistral's attention uses config.sliding_window in every layer, whatever layer_types says.
        windows = [sliding_window] * num_layers
    else:
        # Qwen2 (layer_types derived from use_sliding_window / max_window_layers) and Gemma-2.
        windows = [sliding_window if t == "sliding_attention" else None for t in layer_types]
    return ModelSpec(
        family=family,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        windows=tuple(windows),
        max_positions=getattr(config, "max_position_embeddings", None),
    )
