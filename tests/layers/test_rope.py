"""Partial RoPE: the lane-dense form (whole head width, a signed permutation matmul; used when tracing for TPU)
gives the sliced rotate-half form's values and gradients bit for bit, and both equal the float64 rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax.layers.rope import apply_rope, rope_cos_sin


def _rotate64(x, positions, R, theta):
    """The rotation in float64 numpy: pairs (i, i + R/2) of the first R dims turned by position * theta^(-2i/R)."""
    x = np.asarray(x, np.float64).copy()
    h = R // 2
    inv = theta ** (-np.arange(0, R, 2, dtype=np.float64) / R)
    ang = positions[..., None].astype(np.float64) * inv                       # [B, T, h]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = x[..., :h].copy(), x[..., h:R].copy()
    x[..., :h], x[..., h:R] = a * c - b * s, b * c + a * s
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("K,R", [(48, 12), (48, 48), (64, 16)])
def test_lane_dense_rope_equals_sliced(dtype, K, R):
    positions = (jnp.arange(9)[None] * 37 + jnp.array([[0], [5]])).astype(jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(K + R), (2, 9, 3, K)).astype(dtype)
    cos, sin = rope_cos_sin(positions, R, 1e4, dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def loss(x, dense):
        return jnp.sum(apply_rope(x, cos, sin, lane_dense=dense).astype(jnp.float32) * w)

    sliced, dense = apply_rope(x, cos, sin, lane_dense=False), apply_rope(x, cos, sin, lane_dense=True)
    assert dense.dtype == sliced.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dense, np.float32), np.asarray(sliced, np.float32))
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(x, True), np.float32),
                                  np.asarray(jax.grad(loss)(x, False), np.float32))
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(dense), _rotate64(x, np.asarray(positions), R, 1e4), atol=2e-5)
