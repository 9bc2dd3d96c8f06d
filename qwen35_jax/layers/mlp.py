"""Dense SwiGLU feed-forward: `down(silu(gate x) * up x)`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.layers.common import dense_init


class SwiGLU(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BTD):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa
                                         kernel_init=dense_init(self.init_std), name=name)
        h = jax.nn.silu(dense(self.intermediate_size, "gate_proj")(x_BTD)) * dense(self.intermediate_size,
                                                                                   "up_proj")(x_BTD)
        return dense(self.hidden_size, "down_proj")(h)

    @staticmethod
    def num_params(hidden_size: int, intermediate_size: int) -> int:
        return 3 * hidden_size * intermediate_size
