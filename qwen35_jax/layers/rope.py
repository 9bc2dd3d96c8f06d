"""Partial rotary position embedding (rotate-half / NeoX convention) on the first `rotary_dim` dims of a head."""

import jax.numpy as jnp


def rope_cos_sin(positions_BT, rotary_dim: int, theta: float, dtype):
    """cos, sin of shape [B, T, rotary_dim] (frequencies repeated twice, as rotate-half expects)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTR = jnp.concatenate([angles_BTR, angles_BTR], axis=-1)
    return jnp.cos(angles_BTR).astype(dtype), jnp.sin(angles_BTR).astype(dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BTHK, cos_BTR, sin_BTR):
    """Rotates the first R dims of every head; the remaining dims pass through unchanged."""
    R = cos_BTR.shape[-1]
    if R == 0:
        return x_BTHK
    x_rot, x_pass = x_BTHK[..., :R], x_BTHK[..., R:]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)
