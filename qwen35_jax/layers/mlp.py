"""Dense SwiGLU feed-forward: `down(silu(gate x) * up x)`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.layers.common import dense


class SwiGLU(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    out_std: float | None = None  # down_proj's init std; None: init_std

    @nn.compact
    def __call__(self, x_BTD):
        proj = lambda n, axes, name: dense(n, axes, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                           std=self.init_std, name=name)
        F = self.intermediate_size
        h = jax.nn.silu(proj(F, ("embed", "mlp"), "gate_proj")(x_BTD)) * proj(F, ("embed", "mlp"), "up_proj")(x_BTD)
        out_std = self.init_std if self.out_std is None else self.out_std
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, std=out_std,
                     name="down_proj")(h)

    @staticmethod
    def num_params(hidden_size: int, intermediate_size: int) -> int:
        return 3 * hidden_size * intermediate_size
