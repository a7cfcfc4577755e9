"""A tiny random gpt-oss for the sink tests (CPU: tests/test_sinks.py; GPU: tests/gpu)."""

from __future__ import annotations

import torch
from _tiny import VOCAB
from transformers import GptOssConfig, GptOssForCausalLM


def tiny_gpt_oss(dtype: torch.dtype = torch.float32, seed: int = 0) -> GptOssForCausalLM:
    """A 3-layer gpt-oss (sliding, full, sliding; 4 q heads over 2 kv heads; 4 experts)."""
    config = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=40,
        max_position_embeddings=512,
        # gpt-oss's YaRN, its original length scaled down with the model (512 / 32).
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 16,
            "rope_theta": 150000.0,
        },
        attn_implementation="eager",
        # Plain loops over the experts: they also run in float64 (the reference below).
        experts_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Peaked attention (windows matter) and sinks of the scores' size (they matter).
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape) * 2.0)
    return model.to(dtype).eval()
