"""Partial rotary position embedding (rotate-half / NeoX convention) on the first `rotary_dim` dims of a head, with
optional YaRN scaling (`ModelConfig.rope_scaling`) of the inverse frequencies and of cos/sin."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import target


def rope_inv_freq(rotary_dim: int, theta: float, scaling=None) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim // 2] float32, attention scaling multiplying cos and sin), computed in float32 in the
    order transformers uses (`_compute_default_rope_parameters` / `_compute_yarn_parameters`)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
    if scaling is None:
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    if scaling.rope_type != "yarn":  # validated in config; a guard against a silent plain RoPE
        raise ValueError(f"rope_scaling.rope_type {scaling.rope_type!r} is not implemented")
    factor, dim = float(scaling.factor), rotary_dim

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.attention_factor
    if attention is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention = float(mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (np.float32(1) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def rope_cos_sin(positions_BT, rotary_dim: int, theta: float, dtype, scaling=None):
    """cos, sin of shape [B, T, rotary_dim] (frequencies repeated twice, as rotate-half expects), times the YaRN
    attention scaling when `scaling` (a `config.RopeScaling`) is given."""
    inv_freq, attention = rope_inv_freq(rotary_dim, theta, scaling)
    angles_BTR = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_BTR = jnp.concatenate([angles_BTR, angles_BTR], axis=-1)
    cos, sin = jnp.cos(angles_BTR), jnp.sin(angles_BTR)
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_half_matrix(head_dim: int, rotary_dim: int) -> np.ndarray:
    """[K, K] signed permutation M with x @ M = rotate_half of x's first R dims, zero on the rest."""
    M, h = np.zeros((head_dim, head_dim), np.float32), rotary_dim // 2
    M[np.arange(h) + h, np.arange(h)] = -1.0
    M[np.arange(h), np.arange(h) + h] = 1.0
    return M


def apply_rope(x_BTHK, cos_BTR, sin_BTR, *, lane_dense: bool | None = None):
    """Rotates the first R dims of every head; the remaining dims pass through unchanged.

    `lane_dense` (default: when tracing for TPU) writes it on the whole head width, x cos' + (x M) sin' with cos'
    = 1 and sin' = 0 past R and M `rotate_half_matrix`: no [.., R / 2] slices, which a TPU lays out padded to 128
    lanes (the tiny model's R / 2 = 6 takes 21x its size, 32 MiB per 16k-token slice). The values are the same:
    one +-1 term per output, the pass-through dims times exactly 1 plus 0."""
    R, K = cos_BTR.shape[-1], x_BTHK.shape[-1]
    if R == 0:
        return x_BTHK
    if target.on_tpu() if lane_dense is None else lane_dense:
        B, T = cos_BTR.shape[:2]
        cos = jnp.concatenate([cos_BTR, jnp.ones((B, T, K - R), cos_BTR.dtype)], axis=-1)[:, :, None, :]
        sin = jnp.concatenate([sin_BTR, jnp.zeros((B, T, K - R), sin_BTR.dtype)], axis=-1)[:, :, None, :]
        M = jnp.asarray(rotate_half_matrix(K, R), x_BTHK.dtype)
        rotated = jnp.einsum("bthk,kj->bthj", x_BTHK, M, precision=jax.lax.Precision.HIGHEST)
        return x_BTHK * cos + rotated * sin
    x_rot, x_pass = x_BTHK[..., :R], x_BTHK[..., R:]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)
