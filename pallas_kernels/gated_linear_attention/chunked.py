"""Chunked gated linear attention in XLA (the training and prefill path on every backend).

Per chunk with in-chunk cumulative log decay gamma and D[i, j] = exp(gamma_i - gamma_j) (i >= j, same document):
    O = (Q exp(gamma)) S + (Q K^T * D) V;   S = exp(gamma_last) S + (K exp(gamma_last - gamma))^T V.
The incoming state reaches only tokens of the chunk's first document; only its last document updates S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.reference import document_starts

from .reference import prepare_gla

HI = jax.lax.Precision.HIGHEST


def chunked_gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                                   segment_ids=None, use_qk_l2norm=False, chunk_size=64):
    """Same arguments and returns as `recurrent_gated_linear_attention`."""
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, acc = prepare_gla(q, k, v, g, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q.shape[-1]
    C = min(chunk_size, max(T, 1))
    N = -(-T // C)
    pad = N * C - T
    doc = jnp.cumsum(document_starts(segment_ids, B, T).astype(jnp.int32), axis=1)
    if pad:  # zero q, k, v and g = 0 make padding exact
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, g = map(padt, (q, k, v, g))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    chunks = lambda x: jnp.moveaxis(x.reshape((B, N, C, Hv) + x.shape[3:]), 3, 1)  # noqa: E731  [B,H,N,C,...]
    qc, kc, vc, gc = chunks(q), chunks(k), chunks(v), chunks(g)
    docc = doc.reshape(B, N, C)[:, None]                                        # [B, 1, N, C]
    doc_prev = jnp.concatenate([doc[:, :1], doc.reshape(B, N, C)[:, :-1, -1]], axis=1)[:, None]
    carry = docc == doc_prev[..., None]                                         # token still in the incoming doc
    mask = (docc[..., :, None] == docc[..., None, :]) & jnp.tril(jnp.ones((C, C), bool))
    gamma = jnp.cumsum(gc, axis=-1)
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)          # mask before exp: no overflow
    P = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc, precision=HI) * decay
    intra = jnp.einsum("bhncs,bhnsv->bhncv", P, vc, precision=HI)
    Qd = qc * (jnp.exp(gamma) * carry)[..., None]
    g_last = gamma[..., -1:]
    Kd = kc * (jnp.exp(g_last - gamma) * (docc == docc[..., -1:]))[..., None]
    S_decay = jnp.exp(g_last[..., 0]) * carry[..., -1]                          # [B, H, N]
    S0 = jnp.zeros((B, Hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)

    def step(S, xs):
        intra_n, Qd_n, Kd_n, V_n, dec_n = xs
        O = jnp.einsum("bhck,bhkv->bhcv", Qd_n, S, precision=HI) + intra_n
        S = dec_n[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", Kd_n, V_n, precision=HI)
        return S, O

    S, O = jax.lax.scan(step, S0, tuple(jnp.moveaxis(x, 2, 0) for x in (intra, Qd, Kd, vc, S_decay)))
    o = jnp.moveaxis(O, 0, 2).reshape(B, Hv, N * C, dv)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(out_dtype), (S if output_final_state else None)
