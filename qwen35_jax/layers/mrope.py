"""Interleaved multimodal RoPE (Qwen3.5 mRoPE): three position rows (time, height, width) share the rotary width.

Frequency i takes its angle from the height row when i % 3 == 1 and i < 3 * section[1], from the width row when
i % 3 == 2 and i < 3 * section[2], otherwise from the time row (transformers' `mrope_interleaved`). Text tokens
carry three equal rows, so text-only mRoPE is plain RoPE. Built on `rope_cos_sin` row by row, so whatever that
function does to frequencies and scale (YaRN) applies here unchanged.
"""

import jax.numpy as jnp
import numpy as np

from qwen35_jax.layers.rope import rope_cos_sin


def mrope_rows(num_freqs: int, section) -> np.ndarray:
    """Which position row (0 time, 1 height, 2 width) drives each of `num_freqs` frequencies."""
    i = np.arange(num_freqs)
    rows = np.zeros(num_freqs, np.int32)
    rows[(i % 3 == 1) & (i < 3 * section[1])] = 1
    rows[(i % 3 == 2) & (i < 3 * section[2])] = 2
    return rows


def mrope_cos_sin(positions_3BT, rotary_dim: int, theta: float, section, dtype, **rope_kwargs):
    """cos, sin [B, T, rotary_dim] from positions [3, B, T]."""
    rows = mrope_rows(rotary_dim // 2, section)
    pick = jnp.asarray(np.concatenate([rows, rows]))  # rotate-half layout: the frequencies twice
    per_row = [rope_cos_sin(positions_3BT[r], rotary_dim, theta, dtype, **rope_kwargs) for r in range(3)]
    cos = jnp.stack([c for c, _ in per_row])  # [3, B, T, R]
    sin = jnp.stack([s for _, s in per_row])
    onehot = (pick[None, :] == jnp.arange(3)[:, None]).astype(cos.dtype)[:, None, None, :]
    return jnp.sum(cos * onehot, 0), jnp.sum(sin * onehot, 0)
