"""RMS norms. Zero-centred `(1 + w)` everywhere except the Gated DeltaNet output norm (plain weight, then gate)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.layers.common import param


def rms_normalize(x, eps: float):
    """x * rsqrt(mean(x^2) + eps) in float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `x / rms(x) * (1 + w)` in fp32, cast back to the input dtype; w starts at 0."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = param(self, "scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype, ("norm",))
        return (rms_normalize(x, self.eps) * (1.0 + w.astype(jnp.promote_types(x.dtype, jnp.float32)))).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet output norm: `(x / rms(x)) * w * silu(z)`, norm before gate, plain weight (starts at 1)."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, z):
        w = param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype, ("norm",))
        y = w.astype(x.dtype) * rms_normalize(x, self.eps).astype(x.dtype)
        return (y * jax.nn.silu(z.astype(jnp.promote_types(z.dtype, jnp.float32)))).astype(x.dtype)
