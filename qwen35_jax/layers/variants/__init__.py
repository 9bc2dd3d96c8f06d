"""Token-mixer ablation variants, registered by name and pattern letter (see `experiments/README.md`).

Adding a variant: one module class with `cfg`, `__call__(x_BTD, *, segment_ids_BT, positions_BT)`, and the
staticmethods `num_params(cfg)`, `sequence_flops(cfg, seq_len)`, `state_size(cfg, seq_len)`; one `register_mixer` line.
"""

from qwen35_jax.layers import register_mixer
from qwen35_jax.layers.variants.attention import HeadwiseGatedAttention, SlidingWindowAttention, SoftmaxAttention
from qwen35_jax.layers.variants.linear import (DeltaNet, GatedLinearAttention, LinearAttention, LinearAttentionBlock,
                                               chunk_gated_linear_attention, recurrent_gated_linear_attention)

# name, class, letter; "gdn" (G) and "attn" (A) are registered by `qwen35_jax.layers` itself.
VARIANTS = (
    ("softmax", SoftmaxAttention, "F"),
    ("attn_headwise", HeadwiseGatedAttention, "H"),
    ("swa", SlidingWindowAttention, "S"),
    ("linear", LinearAttention, "L"),
    ("gla", GatedLinearAttention, "M"),
    ("deltanet", DeltaNet, "D"),
)
for _name, _cls, _letter in VARIANTS:
    register_mixer(_name, _cls, _letter)

__all__ = ["SoftmaxAttention", "HeadwiseGatedAttention", "SlidingWindowAttention", "LinearAttention",
           "GatedLinearAttention", "DeltaNet", "LinearAttentionBlock", "chunk_gated_linear_attention",
           "recurrent_gated_linear_attention", "VARIANTS"]
