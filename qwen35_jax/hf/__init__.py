"""Hugging Face checkpoints: `load(path) -> (cfg, params)` and `save(cfg, params, path)`.

Reads config.json plus safetensors (one file or a sharded index) of the families `qwen3_5`, `qwen3_5_text`,
`qwen3_5_moe`, `qwen3_5_moe_text` (vision-language folders contribute their text tower under
`model.language_model.`) and `qwen3_next`, in any mix of expert layouts, bf16/fp32 or block-scaled FP8.
The parts: `config` (config.json <-> ModelConfig, every key honoured or refused), `layout` (the tensor description
both directions walk; `register_extension` is the extension point for other towers), `fp8`, `safetensors_io`
(memory-mapped reads, streamed writes) and `io` (load and save, onto a mesh or from sharded arrays).
"""

from qwen35_jax.hf.common import CheckpointError, dtype_name
from qwen35_jax.hf.config import check_same_model, config_from_hf, config_mismatch, config_to_hf
from qwen35_jax.hf.io import load, save
from qwen35_jax.hf.layout import (EXTENSIONS, LAYOUTS, Layout, Spec, T, _leaf, detect_layout, register_extension,
                                  tensor_specs)

__all__ = ["load", "save", "config_from_hf", "config_to_hf", "config_mismatch", "check_same_model",
           "CheckpointError", "dtype_name", "LAYOUTS", "Layout", "Spec", "tensor_specs", "detect_layout",
           "register_extension", "EXTENSIONS"]

from qwen35_jax import hf_vision  # noqa: E402  (the vision tower registers its tensors and config keys)

register_extension(hf_vision)
