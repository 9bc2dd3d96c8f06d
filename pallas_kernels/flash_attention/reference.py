"""Dense masked softmax attention: the obviously-correct reference (float64-capable) for the blocked kernels.

Query t (global index `q_offset + t`) reads key s when s <= q_offset + t, both carry the same segment id and, with a
sliding window W > 0, q_offset + t - s < W. Query head h reads key/value head h // (H / G).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def mask_BTS(q_segment_ids_BT, kv_segment_ids_BS, q_offset=0, sliding_window: int = 0):
    """[B, T, S] bool: causal by global index, same document, inside the window."""
    T, S = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    qi = q_offset + jnp.arange(T)[:, None]
    ki = jnp.arange(S)[None, :]
    allowed = ki <= qi
    if sliding_window:
        allowed = allowed & (qi - ki < sliding_window)
    return allowed[None] & (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])


def reference_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, *, q_offset=0,
                        sliding_window: int = 0, return_lse: bool = False):
    """Softmax attention with the [T, S] matrix formed, in the accumulation dtype (fp32, or fp64 under x64).
    Returns o [B, T, H, K] in v's dtype (and the row logsumexp [B, H, T] with `return_lse`)."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    acc = jnp.promote_types(q_BTHK.dtype, jnp.float32)
    q = q_BTHK.reshape(B, T, G, H // G, K)
    s = jnp.einsum("BTGRK,BSGK->BGRTS", q, k_BSGK, preferred_element_type=acc) * (K ** -0.5)
    mask = mask_BTS(q_segment_ids_BT, kv_segment_ids_BS, q_offset, sliding_window)[:, None, None]
    s = jnp.where(mask, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("BGRTS,BSGK->BTGRK", p.astype(v_BSGK.dtype), v_BSGK).reshape(B, T, H, K)
    if return_lse:
        return o, jax.nn.logsumexp(s, axis=-1).reshape(B, H, T)
    return o
