"""Dense masked softmax attention in query blocks that skip the keys no query of the block can see.

Each block of `block_q` queries is `reference.reference_attention` against only the keys between the block's
earliest visible key (its first query minus the sliding window) and its last query (causal): at T = S without a
window and 4 blocks that is 10/16 of the [T, S] scores, exps and their gradients. Autodiff gives the backward.
On this CPU at BENCH_SMALL's attention shapes (4 x 512 tokens, 4 query and 2 kv heads of 64, fp32, two idle
cores) the forward took 12-14 ms at 32-128-row blocks against 41 ms for the whole matrix, forward+backward 34-38 ms
against 63 ms (128 rows: 14.3 / 34.0). A hand-written backward (dV = P^T dO, dS = P (dP - rowsum(dO O)), ...) was
slower than autodiff's at every block size (on one core 88-118 ms against 64-70) and was not kept. Values and
gradients are tested against the float64 reference. The block bounds are `blocked._key_range`'s, in keys rather than
key blocks and as Python ints (static slices).
"""

from __future__ import annotations

from jax import numpy as jnp

from .reference import reference_attention


def dense_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, *, q_offset=0,
                    sliding_window: int = 0, block_q: int = 0):
    """o [B, T, H, K] in v's dtype, `reference_attention`'s values. block_q > 0 with a static (Python int)
    `q_offset` splits the queries into blocks of that many rows; otherwise this is the reference itself."""
    T, S = q_BTHK.shape[1], k_BSGK.shape[1]
    if not block_q or block_q >= T or not isinstance(q_offset, int):
        return reference_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, q_offset=q_offset,
                                   sliding_window=sliding_window)
    outs = []
    for t0 in range(0, T, block_q):
        t1 = min(t0 + block_q, T)
        s0 = max(q_offset + t0 - sliding_window + 1, 0) if sliding_window else 0
        s1 = min(q_offset + t1, S)
        # keys s0..s1-1 as indices 0..s1-s0-1: shifting the query offset by s0 keeps every causal/window relation
        outs.append(reference_attention(q_BTHK[:, t0:t1], k_BSGK[:, s0:s1], v_BSGK[:, s0:s1],
                                        q_segment_ids_BT[:, t0:t1], kv_segment_ids_BS[:, s0:s1],
                                        q_offset=q_offset + t0 - s0, sliding_window=sliding_window))
    return jnp.concatenate(outs, axis=1)
