"""Softmax-attention ablation siblings of Qwen3.5's gated attention: the same module with a different contract.

Each variant is `GatedAttention` run on a config with one or two attention fields overridden, so projections, q/k
norms, partial RoPE, GQA, masking and the KV cache are shared code and the parameter tree keeps the same names:
  softmax        no output gate, full causal attention ("G0" baseline of the Gated Attention paper)
  attn_headwise  one sigmoid gate per head (gate width 1), full causal attention
  swa            the elementwise-gated attention over a sliding window (cfg.sliding_window, or 64 when it is 0)
"""

from __future__ import annotations

import dataclasses
import functools

from qwen35_jax.layers.attention import GatedAttention

DEFAULT_WINDOW = 64  # sliding window used by "swa" when cfg.sliding_window is 0


@functools.lru_cache(maxsize=256)
def _override(cfg, items: tuple):
    changed = {k: v for k, v in items if getattr(cfg, k) != v}
    return dataclasses.replace(cfg, **changed) if changed else cfg


class _AttentionVariant(GatedAttention):
    """`GatedAttention` on `adapt(cfg)`; subclasses define `adapt` (a pure config -> config map)."""

    @staticmethod
    def adapt(cfg):
        raise NotImplementedError

    def __post_init__(self):
        # Linen modules are frozen dataclasses: swap the config once, before Flax finishes construction.
        object.__setattr__(self, "cfg", self.adapt(self.cfg))
        super().__post_init__()

    @classmethod
    def num_params(cls, cfg) -> int:
        return GatedAttention.num_params(cls.adapt(cfg))

    @classmethod
    def sequence_flops(cls, cfg, seq_len: int) -> float:
        return GatedAttention.sequence_flops(cls.adapt(cfg), seq_len)

    @classmethod
    def state_size(cls, cfg, seq_len: int) -> int:
        return GatedAttention.state_size(cls.adapt(cfg), seq_len)


class SoftmaxAttention(_AttentionVariant):
    """Plain causal softmax attention: no output gate, no window."""

    @staticmethod
    def adapt(cfg):
        return _override(cfg, (("attn_output_gate", "none"), ("sliding_window", 0)))


class HeadwiseGatedAttention(_AttentionVariant):
    """Causal softmax attention with a headwise sigmoid output gate (one scalar per head and token)."""

    @staticmethod
    def adapt(cfg):
        return _override(cfg, (("attn_output_gate", "headwise"), ("sliding_window", 0)))


class SlidingWindowAttention(_AttentionVariant):
    """Gated attention (gate as cfg.attn_output_gate) over the last `cfg.sliding_window or 64` positions."""

    @staticmethod
    def adapt(cfg):
        return _override(cfg, (("sliding_window", cfg.sliding_window or DEFAULT_WINDOW),))
