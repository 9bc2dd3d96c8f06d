"""Layers, one idea per file. Token mixers are registered by name; a layer pattern names them per layer."""

from qwen35_jax.layers.attention import GatedAttention
from qwen35_jax.layers.gdn import GatedDeltaNet
from qwen35_jax.layers.mlp import SwiGLU
from qwen35_jax.layers.moe import MoE
from qwen35_jax.layers.norms import GatedRMSNorm, RMSNorm

# name -> module class; each class takes `cfg`, is called as `mixer(x_BTD, segment_ids_BT=..., positions_BT=...)`
# and provides `num_params(cfg)` and `sequence_flops(cfg, seq_len)`.
MIXERS = {
    "gdn": GatedDeltaNet,
    "attn": GatedAttention,
}


def register_mixer(name: str, cls, letter: str | None = None) -> None:
    """Adds a token mixer (ablation variants use this); `letter` names it in compact patterns like "GGGA"."""
    from qwen35_jax.config import register_mixer_letter

    MIXERS[name] = cls
    if letter:
        register_mixer_letter(letter, name)


__all__ = ["MIXERS", "register_mixer", "GatedAttention", "GatedDeltaNet", "SwiGLU", "MoE", "RMSNorm",
           "GatedRMSNorm"]

from qwen35_jax.layers import variants  # noqa: E402,F401  registers the ablation mixers
