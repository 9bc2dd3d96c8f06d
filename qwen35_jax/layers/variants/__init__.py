"""Softmax-attention ablation variants (the linear-attention siblings are Gated DeltaNet's switches, `layers/gdn.py`);
all are named in `layers/registry.py` (see `experiments/README.md`).

Adding a variant: one module class with `cfg`, `__call__(x_BTD, *, segment_ids_BT, positions_BT)`, and the
staticmethods `num_params(cfg)`, `sequence_flops(cfg, seq_len)`, `state_size(cfg, seq_len)`; one entry in the
table of `layers/registry.py`.
"""

from qwen35_jax.layers.variants.attention import HeadwiseGatedAttention, SlidingWindowAttention, SoftmaxAttention

__all__ = ["SoftmaxAttention", "HeadwiseGatedAttention", "SlidingWindowAttention"]
