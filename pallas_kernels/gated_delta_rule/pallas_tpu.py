"""Fused Pallas TPU (Mosaic) kernels for the chunked gated delta rule, forward and backward; interpret mode on CPU.

One grid step handles one chunk of one (batch row, value head); grid (B, Hv, N) with the chunk axis sequential and
the fp32 state [dk, dv] (backward: its gradient) carried in VMEM scratch. Everything within a chunk (decay matrix,
masked K K^T, the triangular inverse, W, U, Vnew, output, state update) stays on chip: the forward reads q, k, v and
the per-token scalars once and writes only o (and the final state). The backward first reruns the forward
recurrence writing only the chunk-start states (one [dk, dv] fp32 state per chunk), then walks the chunks in
reverse recomputing every intra-chunk quantity from q, k, v and that state.

Layouts: q, k, v, o stay [B, T, H * d] (no transposes) when d is a multiple of 128, so each block is a lane-dense
[C, d] tile at lane block h; otherwise they are made head-major [B, H, T, d]. Per-token scalars (in-chunk
cumulative log decay, beta, chunk-local document number) are lane-dense [B, Hv, N, C] rows kept resident for a
whole (batch row, head); columns are formed in-kernel by a masked lane reduction (no transposes). The triangular
inverse is a log-depth block doubling made of masked full-size matmuls (no matrix powers), see `_unit_lower_inverse`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .reference import document_starts

HI = jax.lax.Precision.HIGHEST
_VMEM_CAP = 48 * 1024 * 1024
_NN = (((1,), (0,)), ((), ()))   # x @ y
_NT = (((1,), (1,)), ((), ()))   # x @ y.T
_TN = (((0,), (0,)), ((), ()))   # x.T @ y


def _dot(x, y, dims=_NN):
    return jax.lax.dot_general(x, y, dims, precision=HI, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- in-chunk algebra
def _iota(C):
    return jax.lax.broadcasted_iota(jnp.int32, (C, C), 0), jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)


def _col(row_1C, eye):
    """[1, C] -> [C, 1] without a transpose: a masked lane reduction of the broadcast row."""
    return jnp.sum(jnp.where(eye, row_1C, 0.0), axis=1, keepdims=True)


def _row(col_C1, eye):
    """[C, 1] -> [1, C]: a masked sublane reduction of the broadcast column."""
    return jnp.sum(jnp.where(eye, col_C1, 0.0), axis=0, keepdims=True)


def _unit_lower_inverse(A_CC, ii, jj):
    """(I + A)^-1 for strictly lower-triangular A by block doubling with masked full-size matmuls.

    X holds the inverses of the diagonal s x s blocks; one level merges pairs into 2s x 2s blocks with
    X <- X - X A_s X, where A_s keeps only the lower-left s x s sub-block of every 2s diagonal block. This gives
    [[X1, 0], [-X2 A21 X1, X2]] exactly, forms only true sub-blocks of the inverse (no powers of A), and is two
    MXU matmuls per level, log2(C) levels.
    """
    C = A_CC.shape[0]
    X = (ii == jj).astype(jnp.float32)
    s, log_s = 1, 0
    while s < C:
        pair = (ii >> (log_s + 1)) == (jj >> (log_s + 1))
        lower_left = (((ii >> log_s) & 1) == 1) & (((jj >> log_s) & 1) == 0)
        A_s = jnp.where(pair & lower_left, A_CC, 0.0)
        X = X - _dot(_dot(X, A_s), X)
        s, log_s = 2 * s, log_s + 1
    return X


def _l2norm(x, on: bool):
    if not on:
        return x, None
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + 1e-6)
    return x * r, r


class _Chunk:
    """Everything the forward and the backward recompute for one chunk (all fp32)."""

    def __init__(self, q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, n, *, scale, l2norm):
        q_raw = q_ref[...].astype(jnp.float32)
        k_raw = k_ref[...].astype(jnp.float32)
        C = q_raw.shape[0]
        self.ii, self.jj = _iota(C)
        self.eye = self.ii == self.jj
        gam_r = gam_ref[pl.ds(n, 1), :]                          # [1, C] in-chunk cumulative log decay
        beta_r = beta_ref[pl.ds(n, 1), :]
        doc_r = doc_ref[pl.ds(n, 1), :]                          # chunk-local document number, 0 = incoming doc
        gam_c, beta_c, doc_c = _col(gam_r, self.eye), _col(beta_r, self.eye), _col(doc_r, self.eye)
        q_hat, self.rq = _l2norm(q_raw, l2norm)
        k, self.rk = _l2norm(k_raw, l2norm)
        self.q_raw, self.k_raw, self.q_hat = q_raw, k_raw, q_hat
        self.q, self.k, self.v = q_hat * scale, k, v_ref[...].astype(jnp.float32)
        self.gam_c, self.gam_r, self.beta_c, self.beta_r = gam_c, gam_r, beta_c, beta_r
        self.M = (doc_c == doc_r) & (self.ii >= self.jj)         # same document, causal (diagonal included)
        self.Ms = self.M & ~self.eye
        self.D = jnp.where(self.M, jnp.exp(jnp.where(self.M, gam_c - gam_r, 0.0)), 0.0)
        gam_L, doc_L = gam_r[:, C - 1:], doc_r[:, C - 1:]        # [1, 1]
        self.e_c = jnp.exp(gam_c) * (doc_c == 0)                 # decay from the chunk start, incoming doc only
        self.f_c = jnp.exp(gam_L - gam_c) * (doc_c == doc_L)     # decay to the chunk end, last doc only
        self.s_dec = jnp.exp(gam_L) * (doc_L == 0)               # [1, 1] decay of the incoming state
        self.KK = _dot(self.k, self.k, _NT)
        self.B = jnp.where(self.Ms, self.KK * self.D, 0.0)
        self.Tinv = _unit_lower_inverse(self.B * beta_c, self.ii, self.jj)
        self.vb = self.v * beta_c
        self.kw = self.k * (beta_c * self.e_c)
        self.U = _dot(self.Tinv, self.vb)
        self.W = _dot(self.Tinv, self.kw)
        self.QK = _dot(self.q, self.k, _NT)
        self.P = self.QK * self.D

    def forward(self, S):
        """(Vnew, output, next state) from the chunk-start state S [dk, dv]."""
        Vn = self.U - _dot(self.W, S)
        O = _dot(self.q * self.e_c, S) + _dot(self.P, Vn)
        S_next = self.s_dec * S + _dot(self.k * self.f_c, Vn, _TN)
        return Vn, O, S_next


# ----------------------------------------------------------------------------------------------------- kernels
def _forward_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, s0_ref, *refs, scale, l2norm, emit):
    """emit "output": o and the final state; emit "states": the chunk-start state of every chunk."""
    if emit == "output":
        o_ref, sT_ref, S_scr = refs
    else:
        states_ref, S_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        S_scr[...] = s0_ref[...].astype(jnp.float32)

    ch = _Chunk(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, n, scale=scale, l2norm=l2norm)
    S = S_scr[...]
    _, O, S_next = ch.forward(S)
    S_scr[...] = S_next
    if emit == "output":
        o_ref[...] = O.astype(o_ref.dtype)

        @pl.when(n == pl.num_programs(2) - 1)
        def _final():
            sT_ref[...] = S_next
    else:
        states_ref[...] = S


def _backward_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, states_ref, do_ref, dsT_ref,
                     dq_ref, dk_ref, dv_ref, dgam_ref, dbeta_ref, ds0_ref, dS_scr, *, scale, l2norm):
    i, N = pl.program_id(2), pl.num_programs(2)
    n = N - 1 - i

    @pl.when(i == 0)
    def _init():
        dS_scr[...] = dsT_ref[...].astype(jnp.float32)

    ch = _Chunk(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, n, scale=scale, l2norm=l2norm)
    S, dS_next, dO = states_ref[...], dS_scr[...], do_ref[...].astype(jnp.float32)
    Vn = ch.U - _dot(ch.W, S)
    Kd = ch.k * ch.f_c
    Qd = ch.q * ch.e_c
    dVn = _dot(ch.P, dO, _TN) + _dot(Kd, dS_next)                 # O = P Vn; S' = Kd^T Vn
    dP = _dot(dO, Vn, _NT)
    dQd = _dot(dO, S, _NT)
    dKd = _dot(Vn, dS_next, _NT)
    dS = _dot(Qd, dO, _TN) - _dot(ch.W, dVn, _TN) + ch.s_dec * dS_next
    dW = -_dot(dVn, S, _NT)
    dvb = _dot(ch.Tinv, dVn, _TN)                                 # U = Tinv vb; W = Tinv kw
    dkw = _dot(ch.Tinv, dW, _TN)
    dTinv = _dot(dVn, ch.vb, _NT) + _dot(dW, ch.kw, _NT)
    dA = -_dot(_dot(ch.Tinv, dTinv, _TN), ch.Tinv, _NT)           # Tinv = (I + A)^-1
    dA = jnp.where(ch.Ms, dA, 0.0)
    dbeta_c = jnp.sum(dA * ch.B, axis=1, keepdims=True)           # A = diag(beta) B
    dB = dA * ch.beta_c
    dKK = dB * ch.D
    dD = dB * ch.KK + dP * ch.QK
    dQK = dP * ch.D
    dq = _dot(dQK, ch.k) + ch.e_c * dQd
    dk = _dot(dQK, ch.q, _TN) + _dot(dKK, ch.k) + _dot(dKK, ch.k, _TN) + (ch.beta_c * ch.e_c) * dkw + ch.f_c * dKd
    dv = ch.beta_c * dvb
    dbeta_c = dbeta_c + jnp.sum(dvb * ch.v, axis=1, keepdims=True) + ch.e_c * jnp.sum(dkw * ch.k, axis=1,
                                                                                       keepdims=True)
    # gamma: through e (chunk start decay), f (chunk end decay), the state decay and the decay matrix D
    de_c = jnp.sum(dQd * ch.q, axis=1, keepdims=True) + ch.beta_c * jnp.sum(dkw * ch.k, axis=1, keepdims=True)
    df_f = jnp.sum(dKd * ch.k, axis=1, keepdims=True) * ch.f_c
    Z = jnp.where(ch.M, dD * ch.D, 0.0)
    dgam_c = de_c * ch.e_c - df_f + jnp.sum(Z, axis=1, keepdims=True) - _col(jnp.sum(Z, axis=0, keepdims=True),
                                                                            ch.eye)
    dlast = jnp.sum(df_f, axis=0, keepdims=True) + ch.s_dec * jnp.sum(jnp.sum(S * dS_next, axis=1, keepdims=True),
                                                                        axis=0, keepdims=True)
    C = dgam_c.shape[0]
    dgam_c = dgam_c + jnp.where(jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1, dlast, 0.0)
    # q = scale * l2norm(q_raw), k = l2norm(k_raw): dx = r (dx_hat - x_hat (x_hat . dx_hat))
    dq = dq * scale
    if l2norm:
        dq = ch.rq * (dq - ch.q_hat * jnp.sum(ch.q_hat * dq, axis=1, keepdims=True))
        dk = ch.rk * (dk - ch.k * jnp.sum(ch.k * dk, axis=1, keepdims=True))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dgam_ref[pl.ds(n, 1), :] = _row(dgam_c, ch.eye)
    dbeta_ref[pl.ds(n, 1), :] = _row(dbeta_c, ch.eye)
    dS_scr[...] = dS

    @pl.when(i == N - 1)
    def _final():
        ds0_ref[...] = dS


# ------------------------------------------------------------------------------------------------- pallas calls
class _Layout:
    """How a [B, T, H, d] tensor is presented to the kernels, and its block for (batch row, head, chunk)."""

    def __init__(self, d: int, C: int, lane_dense: bool):
        self.d, self.C, self.lane_dense = d, C, lane_dense

    def to_kernel(self, x):
        B, T, H, d = x.shape
        return x.reshape(B, T, H * d) if self.lane_dense else jnp.swapaxes(x, 1, 2)

    def from_kernel(self, x, H):
        if self.lane_dense:
            return x.reshape(x.shape[0], x.shape[1], H, self.d)
        return jnp.swapaxes(x, 1, 2)

    def shape(self, B, T, H):
        return (B, T, H * self.d) if self.lane_dense else (B, H, T, self.d)

    def spec(self, head, chunk):
        if self.lane_dense:
            return pl.BlockSpec((None, self.C, self.d), lambda b, h, n: (b, chunk(n), head(h)))
        return pl.BlockSpec((None, None, self.C, self.d), lambda b, h, n: (b, head(h), chunk(n), 0))


def _flops_per_chunk(C, dk, dv, backward: bool):
    inverse = 4 * C ** 3 * max(C.bit_length() - 1, 0)
    fwd = 2 * C * C * dk * 2 + inverse + 2 * C * C * (dk + dv) + 2 * C * dk * dv * 3 + 2 * C * C * dv
    # backward: the forward's intra-chunk work again, plus about twice its products and two more inverse-sized ones
    return fwd + 2 * fwd + 4 * C ** 3 if backward else fwd


def _compiler_params(C, dk, dv, N, *, itemsize):
    blocks = 2 * C * (2 * dk + 2 * dv) * max(itemsize, 4) + 2 * 4 * 5 * N * max(C, 128) + 4 * 4 * dk * dv
    temps = 40 * 4 * max(C, 128) * max(C, 128) + 16 * 4 * C * max(dk, dv, 128)
    limit = int(min(max(2 * (blocks + temps), 32 * 1024 * 1024), _VMEM_CAP))
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def _rows_spec(N, C):
    return pl.BlockSpec((None, None, N, C), lambda b, h, n: (b, h, 0, 0))


def _forward_call(q, k, v, gam, beta, doc, s0, cfg, *, emit):
    """q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; gam, beta [B, Hv, N, C]; doc [B, N, C]; s0 [B, Hv, dk, dv]."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C, r = cfg["C"], Hv // Hk
    N = T // C
    lk, lv = _Layout(dk, C, dk % 128 == 0), _Layout(dv, C, dv % 128 == 0)
    fwd = lambda n: n  # noqa: E731
    key_head = lambda h: jax.lax.div(h, r)  # noqa: E731  (no floor division in Mosaic index maps)
    in_specs = [lk.spec(key_head, fwd), lk.spec(key_head, fwd), lv.spec(lambda h: h, fwd),
                _rows_spec(N, C), _rows_spec(N, C), pl.BlockSpec((None, N, C), lambda b, h, n: (b, 0, 0)),
                pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))]
    if emit == "output":
        out_shape = [jax.ShapeDtypeStruct(lv.shape(B, T, Hv), v.dtype),
                     jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32)]
        out_specs = [lv.spec(lambda h: h, fwd), pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))]
        out_bytes = v.size * v.dtype.itemsize + B * Hv * dk * dv * 4
    else:
        out_shape = [jax.ShapeDtypeStruct((B, Hv, N, dk, dv), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n: (b, h, n, 0, 0))]
        out_bytes = B * Hv * N * dk * dv * 4
    kernel = functools.partial(_forward_kernel, scale=cfg["scale"], l2norm=cfg["l2norm"], emit=emit)
    in_bytes = r * (q.nbytes + k.nbytes) + v.nbytes + gam.nbytes + beta.nbytes + Hv * doc.nbytes + s0.nbytes
    cost = pl.CostEstimate(flops=B * Hv * N * _flops_per_chunk(C, dk, dv, False),
                           transcendentals=B * Hv * T * (C + 3), bytes_accessed=in_bytes + out_bytes)
    out = pl.pallas_call(
        kernel, grid=(B, Hv, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=_compiler_params(C, dk, dv, N, itemsize=v.dtype.itemsize),
        cost_estimate=cost, interpret=cfg["interpret"],
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), gam, beta, doc, s0)
    if emit == "output":
        return lv.from_kernel(out[0], Hv), out[1]
    return out[0]


def _backward_call(q, k, v, gam, beta, doc, states, do, dsT, cfg):
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C, r = cfg["C"], Hv // Hk
    N = T // C
    lk, lv = _Layout(dk, C, dk % 128 == 0), _Layout(dv, C, dv % 128 == 0)
    rev = lambda n: N - 1 - n  # noqa: E731
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))
    key_head = lambda h: jax.lax.div(h, r)  # noqa: E731  (no floor division in Mosaic index maps)
    in_specs = [lk.spec(key_head, rev), lk.spec(key_head, rev), lv.spec(lambda h: h, rev),
                _rows_spec(N, C), _rows_spec(N, C), pl.BlockSpec((None, N, C), lambda b, h, n: (b, 0, 0)),
                pl.BlockSpec((None, None, None, dk, dv), lambda b, h, n: (b, h, N - 1 - n, 0, 0)),
                lv.spec(lambda h: h, rev), state_spec]
    out_shape = [jax.ShapeDtypeStruct(lk.shape(B, T, Hv), jnp.float32),
                 jax.ShapeDtypeStruct(lk.shape(B, T, Hv), jnp.float32),
                 jax.ShapeDtypeStruct(lv.shape(B, T, Hv), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hv, N, C), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hv, N, C), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32)]
    out_specs = [lk.spec(lambda h: h, rev), lk.spec(lambda h: h, rev), lv.spec(lambda h: h, rev),
                 _rows_spec(N, C), _rows_spec(N, C), state_spec]
    kernel = functools.partial(_backward_kernel, scale=cfg["scale"], l2norm=cfg["l2norm"])
    in_bytes = (r * (q.nbytes + k.nbytes) + v.nbytes + gam.nbytes + beta.nbytes + Hv * doc.nbytes + states.nbytes
                + do.nbytes + dsT.nbytes)
    out_bytes = 4 * B * T * Hv * (2 * dk + dv) + 8 * gam.size + 4 * B * Hv * dk * dv
    cost = pl.CostEstimate(flops=B * Hv * N * _flops_per_chunk(C, dk, dv, True),
                           transcendentals=B * Hv * T * (C + 3), bytes_accessed=in_bytes + out_bytes)
    dq, dk_, dv_, dgam, dbeta, ds0 = pl.pallas_call(
        kernel, grid=(B, Hv, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
        compiler_params=_compiler_params(C, dk, dv, N, itemsize=4),
        cost_estimate=cost, interpret=cfg["interpret"],
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), gam, beta, doc, states, lv.to_kernel(do), dsT)
    # grouped heads: value head h wrote the gradient of key head h // r; sum the r value heads of each key head
    dq = lk.from_kernel(dq, Hv).reshape(B, T, Hk, r, dk).sum(3)
    dk_ = lk.from_kernel(dk_, Hv).reshape(B, T, Hk, r, dk).sum(3)
    return dq, dk_, lv.from_kernel(dv_, Hv), dgam, dbeta, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gdn(q, k, v, gam, beta, doc, s0, cfg):
    return _forward_call(q, k, v, gam, beta, doc, s0, dict(cfg), emit="output")


def _gdn_fwd(q, k, v, gam, beta, doc, s0, cfg):
    return _gdn(q, k, v, gam, beta, doc, s0, cfg), (q, k, v, gam, beta, doc, s0)


def _gdn_bwd(cfg, res, cotangents):
    q, k, v, gam, beta, doc, s0 = res
    do, dsT = cotangents
    cfg = dict(cfg)
    states = _forward_call(q, k, v, gam, beta, doc, s0, cfg, emit="states")
    dq, dk, dv, dgam, dbeta, ds0 = _backward_call(q, k, v, gam, beta, doc, states, do, dsT, cfg)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgam, dbeta, jnp.zeros_like(doc),
            ds0.astype(s0.dtype))


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def pallas_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                            segment_ids=None, use_qk_l2norm=False, chunk_size=64, interpret=None):
    """The chunked gated delta rule as fused Pallas TPU kernels (interpret mode off TPU by default)."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    scale = dk ** -0.5 if scale is None else float(scale)
    starts = document_starts(segment_ids, B, T)
    if pad:  # zero q, k, v and g = beta = 0 make the padding exact; it continues the last document
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, g, beta, starts = map(padt, (q, k, v, g, beta, starts))
    doc = jnp.cumsum(starts.reshape(B, N, C).astype(jnp.int32), axis=-1).astype(jnp.float32)   # chunk-local doc
    rows = lambda x: jnp.moveaxis(x.astype(jnp.float32).reshape(B, N, C, Hv), 3, 1)  # noqa: E731  [B, Hv, N, C]
    gam = jnp.cumsum(rows(g), axis=-1)
    s0 = jnp.zeros((B, Hv, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    cfg = (("C", C), ("scale", scale), ("l2norm", bool(use_qk_l2norm)), ("interpret", interpret))
    o, sT = _gdn(q, k, v, gam, rows(beta), doc, s0, cfg)
    return o[:, :T], (sT if output_final_state else None)
