"""Small helpers shared by the layers: parameter declaration with logical axes, initialisers, dtype names.

Every parameter is declared with `param` (or `dense` for a bias-free projection), naming one logical axis per
dimension (`embed`, `heads`, `mlp`, `vocab`, `expert`, ... or None for "never sharded"; the names are the keys of
`sharding.DEFAULT_RULES`). sharding.py maps those names to mesh axes; nothing is inferred from names or shapes, and a
parameter declared without axes is an error when shardings are made (`sharding.logical_axes`). The axes ride on the
parameter as Flax `LogicallyPartitioned` metadata during `init`; `init_params` returns plain arrays.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from qwen35_jax.sharding import check_logical_axes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def dense_init(std: float):
    return nn.initializers.normal(stddev=std)


def with_axes(init, axes: Sequence[str | None]):
    """An initialiser whose parameter carries its logical axes (one per dimension)."""
    axes = check_logical_axes(tuple(axes))
    return nn.with_logical_partitioning(init, axes)


def param(module: nn.Module, name: str, init, shape: Sequence[int], dtype, axes: Sequence[str | None]):
    """`module.param(name, init, shape, dtype)` declaring the parameter's logical axes, e.g. ("embed", "heads")."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    return module.param(name, with_axes(init, axes), tuple(shape), dtype)


def dense(features: int, axes: tuple[str | None, str | None], *, dtype, param_dtype, std: float, name: str,
          use_bias: bool = False, kernel_init=None):
    """An `nn.Dense` whose [in, out] kernel declares its logical axes, e.g. ("embed", "mlp") (a bias, if any, takes
    the output axis). `kernel_init` defaults to normal(std)."""
    if len(axes) != 2:
        raise ValueError(f"dense {name!r}: a kernel has 2 logical axes (in, out), got {axes}")
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=with_axes(kernel_init or dense_init(std), axes),
                    bias_init=with_axes(nn.initializers.zeros_init(), axes[1:]), name=name)


def dtypes(cfg):
    """(compute dtype, param dtype) of a config."""
    return DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]


def same_segment_BTT(segment_ids_BT):
    """True where query t and key s belong to the same document (segment id 0 marks padding)."""
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def accum_dtype(dtype):
    """float32, or float64 when the model runs in float64 (gradient checks)."""
    return jnp.promote_types(dtype, jnp.float32)
