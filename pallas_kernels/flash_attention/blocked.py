"""Blocked online-softmax (flash) attention in jax.numpy: never forms the [T, S] matrix; the portable path off TPU.

Forward: for each query block a loop over only the key blocks it can see (causal and sliding-window bounds from the
global query index, so a shard's local queries at `q_offset` work against all keys), with a running max, sum and
output in fp32; key blocks sharing no document with the query block are skipped (`lax.cond`). It saves o and the
row logsumexp. Backward (custom VJP, FlashAttention-2): for each key block a loop over the query blocks that see it,
recomputing the probabilities from the logsumexp; dK, dV accumulate per key block, dQ in one fp32 carry.
Memory is linear in T: the largest temporary is one [B, H, block_q, block_k] score block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .reference import NEG_INF


def _blocks(x, n, b, pad_value=0):
    """[B, T, ...] -> [n, B, b, ...] (T padded to n * b)."""
    pad = n * b - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    x = x.reshape((x.shape[0], n, b) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _mask(qi_b, ki_b, qseg_Bq, kseg_Bk, window):
    """[B, 1, 1, bq, bk] for global query indices qi_b [bq] and key indices ki_b [bk]."""
    allowed = ki_b[None, :] <= qi_b[:, None]
    if window:
        allowed = allowed & (qi_b[:, None] - ki_b[None, :] < window)
    return (allowed[None] & (qseg_Bq[:, :, None] == kseg_Bk[:, None, :]))[:, None, None]


def _key_range(i, q_offset, bq, bk, nk, window):
    """Key blocks [lo, hi) that query block i can see."""
    q_lo = q_offset + i * bq
    hi = jnp.clip((q_lo + bq - 1) // bk + 1, 0, nk)
    lo = jnp.clip((q_lo - window + 1) // bk, 0, nk) if window else 0
    return lo, hi


def _query_range(j, q_offset, bq, bk, nq, window):
    """Query blocks [lo, hi) that see key block j."""
    k_lo = j * bk
    lo = jnp.clip((k_lo - q_offset) // bq, 0, nq)
    hi = jnp.clip((k_lo + bk - 1 + window - 1 - q_offset) // bq + 1, 0, nq) if window else nq
    return lo, hi


def _layout(q, k, v, qseg, kseg, bq, bk):
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    nq, nk = -(-T // bq), -(-S // bk)
    qb = _blocks(q.reshape(B, T, G, H // G, K), nq, bq)                 # [nq, B, bq, G, R, K]
    qb = jnp.transpose(qb, (0, 1, 3, 4, 2, 5))                          # [nq, B, G, R, bq, K]
    kb = jnp.transpose(_blocks(k, nk, bk), (0, 1, 3, 2, 4))             # [nk, B, G, bk, K]
    vb = jnp.transpose(_blocks(v, nk, bk), (0, 1, 3, 2, 4))
    # padded queries and keys get ids that match nothing
    qsb = _blocks(qseg, nq, bq, pad_value=-1)                           # [nq, B, bq]
    ksb = _blocks(kseg, nk, bk, pad_value=-2)                           # [nk, B, bk]
    return qb, kb, vb, qsb, ksb, nq, nk


def _unlayout(ob, B, T, H, K):
    """[nq, B, G, R, bq, K] -> [B, T, H, K]."""
    ob = jnp.transpose(ob, (1, 0, 4, 2, 3, 5))                          # [B, nq, bq, G, R, K]
    return ob.reshape(B, -1, H, K)[:, :T]


def _forward(q, k, v, qseg, kseg, q_offset, window, bq, bk):
    B, T, H, K = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scale = K ** -0.5
    qb, kb, vb, qsb, ksb, nq, nk = _layout(q, k, v, qseg, kseg, bq, bk)
    G, R = qb.shape[2], qb.shape[3]

    def one_query_block(i):
        qi, qs = qb[i], qsb[i]
        qidx = q_offset + i * bq + jnp.arange(bq)

        def visit(j, carry):
            m, l, o = carry
            kj, vj, ks = kb[j], vb[j], ksb[j]
            mask = _mask(qidx, j * bk + jnp.arange(bk), qs, ks, window)
            s = jnp.einsum("bgrqk,bgsk->bgrqs", qi, kj, preferred_element_type=acc) * scale
            s = jnp.where(mask, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bgrqs,bgsk->bgrqk", p.astype(v.dtype), vj, preferred_element_type=acc)
            return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * o + pv

        def body(j, carry):
            shares_doc = jnp.any(qs[:, :, None] == ksb[j][:, None, :])
            return jax.lax.cond(shares_doc, lambda c: visit(j, c), lambda c: c, carry)

        lo, hi = _key_range(i, q_offset, bq, bk, nk, window)
        init = (jnp.full((B, G, R, bq), NEG_INF, acc), jnp.zeros((B, G, R, bq), acc),
                jnp.zeros((B, G, R, bq, K), acc))
        m, l, o = jax.lax.fori_loop(lo, hi, body, init)
        safe = l > 0  # only padded query rows see no key at all
        o = jnp.where(safe[..., None], o / jnp.where(safe, l, 1.0)[..., None], 0.0)
        lse = jnp.where(safe, m + jnp.log(jnp.where(safe, l, 1.0)), 0.0)
        return o.astype(v.dtype), lse

    ob, lse = jax.lax.map(one_query_block, jnp.arange(nq))               # [nq, B, G, R, bq, (K)]
    return _unlayout(ob, B, T, H, K), lse


def _backward(q, k, v, qseg, kseg, q_offset, o, lse, do, window, bq, bk):
    B, T, H, K = q.shape
    S = k.shape[1]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scale = K ** -0.5
    qb, kb, vb, qsb, ksb, nq, nk = _layout(q, k, v, qseg, kseg, bq, bk)
    G, R = qb.shape[2], qb.shape[3]
    dob = jnp.transpose(_blocks(do.reshape(B, T, G, R, K), nq, bq), (0, 1, 3, 4, 2, 5))
    obb = jnp.transpose(_blocks(o.reshape(B, T, G, R, K), nq, bq), (0, 1, 3, 4, 2, 5))
    D = jnp.sum(dob.astype(acc) * obb.astype(acc), axis=-1)            # [nq, B, G, R, bq]

    def one_key_block(dq, j):
        kj, vj, ks = kb[j], vb[j], ksb[j]
        kidx = j * bk + jnp.arange(bk)

        def visit(i, carry):
            dq, dk, dv = carry
            qi, qs, doi = qb[i], qsb[i], dob[i]
            mask = _mask(q_offset + i * bq + jnp.arange(bq), kidx, qs, ks, window)
            s = jnp.einsum("bgrqk,bgsk->bgrqs", qi, kj, preferred_element_type=acc) * scale
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv = dv + jnp.einsum("bgrqs,bgrqk->bgsk", p.astype(do.dtype), doi, preferred_element_type=acc)
            dp = jnp.einsum("bgrqk,bgsk->bgrqs", doi, vj, preferred_element_type=acc)
            ds = (p * (dp - D[i][..., None]) * scale).astype(q.dtype)
            dq_i = jnp.einsum("bgrqs,bgsk->bgrqk", ds, kj, preferred_element_type=acc)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, axis=0)
            dk = dk + jnp.einsum("bgrqs,bgrqk->bgsk", ds, qi, preferred_element_type=acc)
            return dq, dk, dv

        def body(i, carry):
            shares_doc = jnp.any(qsb[i][:, :, None] == ks[:, None, :])
            return jax.lax.cond(shares_doc, lambda c: visit(i, c), lambda c: c, carry)

        lo, hi = _query_range(j, q_offset, bq, bk, nq, window)
        zeros = jnp.zeros((B, G, bk, K), acc)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, acc)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, jnp.arange(nk))
    dq = _unlayout(dq, B, T, H, K).astype(q.dtype)
    unk = lambda x: jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(B, -1, G, K)[:, :S]  # noqa: E731
    return dq, unk(dk).astype(k.dtype), unk(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, qseg, kseg, q_offset, window, bq, bk):
    return _forward(q, k, v, qseg, kseg, q_offset, window, bq, bk)[0]


def _flash_fwd(q, k, v, qseg, kseg, q_offset, window, bq, bk):
    o, lse = _forward(q, k, v, qseg, kseg, q_offset, window, bq, bk)
    return o, (q, k, v, qseg, kseg, q_offset, o, lse)


def _flash_bwd(window, bq, bk, res, do):
    q, k, v, qseg, kseg, q_offset, o, lse = res
    dq, dk, dv = _backward(q, k, v, qseg, kseg, q_offset, o, lse, do, window, bq, bk)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, *, q_offset=0,
                      sliding_window: int = 0, block_q: int = 512, block_k: int = 512):
    """o [B, T, H, K] in v's dtype; the mask is that of `reference.mask_BTS` (`q_offset` may be traced)."""
    T, S = q_BTHK.shape[1], k_BSGK.shape[1]
    bq, bk = min(block_q, T), min(block_k, S)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    return _flash(q_BTHK, k_BSGK, v_BSGK, jnp.asarray(q_segment_ids_BT, jnp.int32),
                  jnp.asarray(kv_segment_ids_BS, jnp.int32), q_offset, int(sliding_window), bq, bk)
