"""Context parallelism for the gated delta rule: the sequence split over the devices of one mesh axis.

Called per device inside `shard_map` on its contiguous slice of the sequence. Over a slice the recurrence is an
affine map of the incoming state, S_out = A S_in + B (A [dk, dk] per value head; packed-document starts inside the
slice make A zero). One local pass computes everything at once by running the chunked rule on an augmented state
[A | B] of width dk + dv from [I | 0], with zero values feeding the A block: it returns the output from a zero
state, q's image through the slice's running transition (qA_t = A_t^T q_t) and the slice's map (A, B). Then:
1. an inclusive scan of the maps over the devices, Hillis-Steele with `ppermute` (log2 N rounds of one map each; a
   device past the start receives zeros, which is exactly "the state before the sequence is zero"); a shard whose
   first token starts a new document cuts the chain (its A counts as zero);
2. one more `ppermute` shifts the result by a device: shard s's incoming state S_in;
3. o = o_zero + qA S_in (the output is affine in the incoming state, so no second local pass).
Communication: (log2 N + 1) maps of B Hv dk (dk + dv) fp32 each per device, independent of the sequence length.
Gradients flow through the collectives (the transpose of a ppermute is the inverse permutation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST


def _shift(x, axis_name, n: int, d: int):
    """x from the device d places before along `axis_name` (zeros on the first d devices)."""
    return jax.lax.ppermute(x, axis_name, [(i, i + d) for i in range(n - d)])


def incoming_states(A_BHKK, B_BHKV, continues_B, axis_name):
    """Each device's incoming state [B, Hv, dk, dv] from every device's slice map (A, B) and whether its slice
    continues the previous device's last document (`continues_B`, bool)."""
    n = jax.lax.axis_size(axis_name)
    A = A_BHKK * continues_B[:, None, None, None].astype(A_BHKK.dtype)   # a new document cuts the chain
    Bm = B_BHKV
    d = 1
    while d < n:  # inclusive scan: after round r a device holds the map of its last 2^r slices composed
        A_r, B_r = _shift(A, axis_name, n, d), _shift(Bm, axis_name, n, d)
        Bm = Bm + jnp.einsum("bhij,bhjv->bhiv", A, B_r, precision=HI)
        if 2 * d < n:
            A = jnp.einsum("bhij,bhjk->bhik", A, A_r, precision=HI)
        d *= 2
    S_in = _shift(Bm, axis_name, n, 1)
    return S_in * continues_B[:, None, None, None].astype(S_in.dtype)


def context_parallel_gated_delta_rule(rule, q, k, v, g, beta, *, segment_ids, axis_name):
    """The delta rule on this device's slice of the sequence, with the state carried in from the slices before.

    `rule(q, k, v, g, beta, segment_ids=, initial_state=)` is a chunked implementation returning (o, final state)
    (e.g. `chunk_gated_delta_rule` with its options bound, or the gated linear attention ignoring beta: any update
    affine in the state works); shapes as in `chunk_gated_delta_rule`, T the local length. Returns o [B, T, Hv, dv]
    in v's dtype.
    """
    B, T, Hv, dv = v.shape
    dk = q.shape[-1]
    acc = jnp.promote_types(v.dtype, jnp.float32)
    v_aug = jnp.concatenate([jnp.zeros((B, T, Hv, dk), v.dtype), v], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dk + dv, dtype=jnp.float32), (B, Hv, dk, dk + dv))
    o_aug, S_aug = rule(q, k, v_aug, g, beta, segment_ids=segment_ids, initial_state=eye)
    qA, o0 = o_aug[..., :dk].astype(acc), o_aug[..., dk:].astype(acc)
    A, Bmap = S_aug[..., :dk].astype(acc), S_aug[..., dk:].astype(acc)
    if segment_ids is None:
        continues = jnp.ones((B,), bool)
    else:
        prev_last = _shift(segment_ids[:, -1], axis_name, jax.lax.axis_size(axis_name), 1)
        continues = segment_ids[:, 0] == prev_last
    S_in = incoming_states(A, Bmap, continues, axis_name)
    o = o0 + jnp.einsum("bthj,bhjv->bthv", qA, S_in, precision=HI)
    return o.astype(v.dtype)
