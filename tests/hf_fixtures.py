"""Tiny random `transformers` models of every family, with the weights that default init hides randomised."""

import math

import numpy as np
import torch

FAMILIES = ("qwen3_5_dense_tied", "qwen3_5_dense_untied", "qwen3_5_moe", "qwen3_next")

COMMON = dict(
    vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
# Weights at WEIGHT_SCALE / sqrt(fan_in): random enough to exercise every path, tame enough that bf16 rounding
# does not get amplified chaotically through the layers.
WEIGHT_SCALE = 0.2
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=20)


def hf_config(family: str):
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    if family.startswith("qwen3_5_dense"):
        cfg = Qwen3_5TextConfig(**COMMON, intermediate_size=48, tie_word_embeddings=family.endswith("_tied"))
    elif family == "qwen3_5_moe":
        cfg = Qwen3_5MoeTextConfig(**COMMON, **MOE, tie_word_embeddings=False)
    elif family == "qwen3_next":
        cfg = Qwen3NextConfig(**COMMON, **MOE, intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=True,
                              tie_word_embeddings=False)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model, seed: int = 0) -> None:
    """Every weight random, norms far from their init, A_log and dt_bias off their defaults."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=gen)))
        elif name.endswith("dt_bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "norm" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("linear_attn.norm.weight")
                                                                  else 0.0))
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            # Decisive routers: near-ties in top-k would flip under bf16 rounding in any implementation.
            scale = WEIGHT_SCALE * (8.0 if name.endswith("mlp.gate.weight") else 1.0)
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1)) * scale)


@torch.no_grad()
def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask)
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()
