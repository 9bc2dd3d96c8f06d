"""Small helpers shared by the layers: initialisers, dtype names, the mixer interface."""

import flax.linen as nn
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def dtypes(cfg):
    """(compute dtype, param dtype) of a config."""
    return DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]


def same_segment_BTT(segment_ids_BT):
    """True where query t and key s belong to the same document (segment id 0 marks padding)."""
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def accum_dtype(dtype):
    """float32, or float64 when the model runs in float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)
