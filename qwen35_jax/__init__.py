"""qwen35-jax: a JAX/Flax research reimplementation of Qwen3.5 (hybrid Gated DeltaNet / gated attention, sparse MoE)."""

from qwen35_jax.config import ConfigError, ModelConfig, load_config
from qwen35_jax.generation import GenerationResult, generate
from qwen35_jax.model import forward, init_params

__all__ = ["ConfigError", "ModelConfig", "load_config", "init_params", "forward", "generate", "GenerationResult"]
