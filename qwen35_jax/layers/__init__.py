"""Layers, one idea per file. Token mixers are registered by name and letter (`registry.py`); a layer pattern names
them per layer."""

from qwen35_jax.layers.attention import GatedAttention
from qwen35_jax.layers.gdn import DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention
from qwen35_jax.layers.mlp import SwiGLU
from qwen35_jax.layers.moe import MoE
from qwen35_jax.layers.norms import GatedRMSNorm, RMSNorm
from qwen35_jax.layers.registry import MIXERS, letter_of, mixer_class, register_mixer

__all__ = ["MIXERS", "register_mixer", "mixer_class", "letter_of", "GatedAttention", "GatedDeltaNet",
           "GatedLinearAttention", "LinearAttention", "DeltaNet", "SwiGLU", "MoE", "RMSNorm", "GatedRMSNorm"]
