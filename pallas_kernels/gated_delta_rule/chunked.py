"""The chunked gated delta rule in jax.numpy (WY representation): the portable path for CPU and GPU.

All intra-chunk work (the masked K K^T, the unit-lower-triangular solve for U and W, Q K^T) runs batched over every
chunk at once; only the state recurrence walks the chunks in a `lax.scan`. Packed documents: couplings across a
document boundary are masked, the incoming state reaches only the tokens before the chunk's first boundary, and only
the chunk's last document updates the outgoing state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import document_starts, prepare

HI = jax.lax.Precision.HIGHEST


def _chunks(x, N, C):
    """[B, T, H, ...] -> [B, H, N, C, ...]."""
    B, _, H = x.shape[:3]
    x = x.reshape((B, N, C, H) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two, by log-depth block doubling.

    Each level merges pairs of diagonal blocks: [[X1, 0], [A21, X2]]^-1 = [[X1^-1, 0], [-X2^-1 A21 X1^-1, X2^-1]].
    Only true sub-blocks of the inverse are ever formed (no matrix powers), so it is as stable as forward
    substitution, and every step is a batched matmul.
    """
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"chunk size must be a power of two; got {C}")
    lead = A.shape[:-2]
    X = jnp.ones(lead + (C, 1, 1), A.dtype)                                   # inverses of the 1x1 diagonal blocks
    s = 1
    while s < C:
        nb = C // (2 * s)
        blocks = A.reshape(lead + (nb, 2 * s, nb, 2 * s))
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., nb, 2s, 2s] diagonal pairs
        A21 = blocks[..., s:, :s]
        X = X.reshape(lead + (nb, 2, s, s))
        X1, X2 = X[..., 0, :, :], X[..., 1, :, :]
        X21 = -jnp.matmul(X2, jnp.matmul(A21, X1, precision=HI), precision=HI)
        top = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
        X = jnp.concatenate([top, jnp.concatenate([X21, X2], axis=-1)], axis=-2)
        s *= 2
    return X.reshape(lead + (C, C))


@jax.custom_vjp
def solve_unit_lower(A, Rs):
    """[(I + A)^-1 R for R in Rs] for strictly lower-triangular A [..., C, C] and right-hand sides R [..., C, m].

    The forward forms the inverse once by `unit_lower_inverse`; the backward is two matmuls per right-hand side
    (dR = (I + A)^-T dY, dA = -tril(dR Y^T, -1), summed) rather than autodiff through the inverse's log-depth
    slices, concatenations and per-level products (about a quarter of the op's forward+backward time on CPU at
    chunk 64 before this; benchmarks/README.md, GDN_OP).
    """
    return _solve_fwd(A, Rs)[0]


def _solve_fwd(A, Rs):
    X = unit_lower_inverse(A)
    Ys = tuple(jnp.matmul(X, R, precision=HI) for R in Rs)
    return Ys, (X, Ys)


def _solve_bwd(res, dYs):
    X, Ys = res
    Xt = jnp.swapaxes(X, -1, -2)
    dRs = tuple(jnp.matmul(Xt, dY, precision=HI) for dY in dYs)
    dA = -sum(jnp.matmul(dR, jnp.swapaxes(Y, -1, -2), precision=HI) for dR, Y in zip(dRs, Ys))
    return jnp.where(jnp.tri(X.shape[-1], k=-1, dtype=bool), dA, 0.0).astype(X.dtype), dRs


solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)


def chunked_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                             segment_ids=None, use_qk_l2norm=False, chunk_size=64):
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, beta, acc = prepare(q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q.shape[-1]
    # a short sequence takes the smallest power-of-two chunk that holds it
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    N = -(-T // C)
    pad = N * C - T
    starts = document_starts(segment_ids, B, T)
    # the running document number makes "same document" a comparison; padding continues the last document
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    if pad:  # zero q, k, v and g = beta = 0 make padding exact
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, g, beta = map(padt, (q, k, v, g, beta))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    qc, kc, vc = _chunks(q, N, C), _chunks(k, N, C), _chunks(v, N, C)          # [B, H, N, C, d]
    gc, bc = _chunks(g, N, C), _chunks(beta, N, C)                              # [B, H, N, C]
    docc = doc.reshape(B, N, C)[:, None]                                        # [B, 1, N, C]
    gamma = jnp.cumsum(gc, axis=-1)                                             # in-chunk cumulative log decay
    doc_prev = jnp.concatenate([doc[:, :1], doc.reshape(B, N, C)[:, :-1, -1]], axis=1)[:, None]
    carry = docc == doc_prev[..., None]                                         # token still in the incoming doc
    same = docc[..., :, None] == docc[..., None, :]                             # [B, 1, N, C, C]
    lower_incl = jnp.tril(jnp.ones((C, C), bool))
    mask = same & lower_incl
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)          # mask before exp: no overflow
    strict = mask & ~jnp.eye(C, dtype=bool)
    kk = jnp.einsum("bhncd,bhnsd->bhncs", kc, kc, precision=HI)
    A = jnp.where(strict, kk * decay, 0.0) * bc[..., :, None]
    U, W = solve_unit_lower(A, (vc * bc[..., None], kc * (bc * jnp.exp(gamma) * carry)[..., None]))
    P = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc, precision=HI) * decay
    Qd = qc * (jnp.exp(gamma) * carry)[..., None]
    last_doc = docc[..., -1:]
    g_last = gamma[..., -1:]
    Kd = kc * (jnp.exp(g_last - gamma) * (docc == last_doc))[..., None]
    S_decay = jnp.exp(g_last[..., 0]) * carry[..., -1]                          # [B, H, N]

    S0 = jnp.zeros((B, Hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)

    def step(S, xs):
        U_n, W_n, P_n, Qd_n, Kd_n, dec_n = xs
        Vnew = U_n - jnp.einsum("bhck,bhkv->bhcv", W_n, S, precision=HI)
        O = jnp.einsum("bhck,bhkv->bhcv", Qd_n, S, precision=HI) + jnp.einsum("bhcs,bhsv->bhcv", P_n, Vnew,
                                                                              precision=HI)
        S = dec_n[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", Kd_n, Vnew, precision=HI)
        return S, O

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (U, W, P, Qd, Kd, S_decay))
    S, O = jax.lax.scan(step, S0, xs)                                           # O: [N, B, H, C, dv]
    o = jnp.moveaxis(O, 0, 2).reshape(B, Hv, N * C, dv)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(out_dtype), (S if output_final_state else None)
