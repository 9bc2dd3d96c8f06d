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

from pallas_kernels import target

from .reference import document_starts

HI = jax.lax.Precision.HIGHEST
_VMEM_CAP = 48 * 1024 * 1024
_NN = (((1,), (0,)), ((), ()))   # x @ y
_NT = (((1,), (1,)), ((), ()))   # x @ y.T
_TN = (((0,), (0,)), ((), ()))   # x.T @ y


def _dot(x, y, dims=_NN, *, bf16=False):
    """fp32-accumulated product; true fp32 (HIGHEST) operands, or bf16 operands (one MXU pass) if `bf16`."""
    if bf16:
        return jax.lax.dot_general(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), dims,
                                   preferred_element_type=jnp.float32)
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


def _dot_bf16x3(x, y):
    """x @ y to about fp32 accuracy from three one-pass bf16 MXU products: (xh + xl)(yh + yl) without xl yl."""
    xh, yh = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    xl, yl = (x - xh.astype(jnp.float32)).astype(jnp.bfloat16), (y - yh.astype(jnp.float32)).astype(jnp.bfloat16)
    dot = functools.partial(jax.lax.dot_general, dimension_numbers=_NN, preferred_element_type=jnp.float32)
    return dot(xh, yh) + (dot(xh, yl) + dot(xl, yh))


def _unit_lower_inverse(A_CC, ii, jj, *, bf16x3=False):
    """(I + A)^-1 for strictly lower-triangular A by block doubling with masked full-size matmuls.

    X holds the inverses of the diagonal s x s blocks; one level merges pairs into 2s x 2s blocks with
    X <- X - X A_s X, where A_s keeps only the lower-left s x s sub-block of every 2s diagonal block. This gives
    [[X1, 0], [-X2 A21 X1, X2]] exactly, forms only true sub-blocks of the inverse (no powers of A), and is two
    MXU matmuls per level, log2(C) - 1 levels (the first needs none). Products are true fp32 (HIGHEST, about six
    bf16 passes) or, with `bf16x3`, three explicit bf16 passes (about 2^-16 relative error per product).
    """
    C = A_CC.shape[0]

    def level_mask(log_s):
        pair = (ii >> (log_s + 1)) == (jj >> (log_s + 1))
        return pair & (((ii >> log_s) & 1) == 1) & (((jj >> log_s) & 1) == 0)

    dot = _dot_bf16x3 if bf16x3 else _dot
    X = (ii == jj).astype(jnp.float32) - jnp.where(level_mask(0), A_CC, 0.0)  # level 1: X = I, so X A_1 X = A_1
    s, log_s = 2, 1
    while s < C:
        X = X - dot(dot(X, jnp.where(level_mask(log_s), A_CC, 0.0)), X)
        s, log_s = 2 * s, log_s + 1
    return X


def _l2norm(x, on: bool):
    if not on:
        return x, None
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + 1e-6)
    return x * r, r


class _Keys:
    """The key-head part of a chunk, shared by the r value heads that read it (all fp32)."""

    def __init__(self, q_ref, k_ref, *, scale, l2norm, mm, bf16):
        self.mm, self.bf16 = mm, bf16
        q_raw = q_ref[...].astype(jnp.float32)
        k_raw = k_ref[...].astype(jnp.float32)
        self.C = C = q_raw.shape[0]
        self.ii, self.jj = _iota(C)
        self.eye = self.ii == self.jj
        self.q_hat, self.rq = _l2norm(q_raw, l2norm)
        self.k, self.rk = _l2norm(k_raw, l2norm)
        self.q = self.q_hat * scale
        self.KK = mm(self.k, self.k, _NT)
        self.QK = mm(self.q, self.k, _NT)


class _Head:
    """One value head's part of a chunk: decay, WY factors (all fp32), recomputed by forward and backward."""

    def __init__(self, keys, v, gam_r, beta_r, doc_r):
        C, eye, mm = keys.C, keys.eye, keys.mm
        self.v = v.astype(jnp.float32)
        gam_c, beta_c, doc_c = _col(gam_r, eye), _col(beta_r, eye), _col(doc_r, eye)
        self.beta_c = beta_c
        self.M = (doc_c == doc_r) & (keys.ii >= keys.jj)         # same document, causal (diagonal included)
        self.Ms = self.M & ~eye
        self.D = jnp.where(self.M, jnp.exp(jnp.where(self.M, gam_c - gam_r, 0.0)), 0.0)
        gam_L, doc_L = gam_r[:, C - 1:], doc_r[:, C - 1:]        # [1, 1]
        self.e_c = jnp.exp(gam_c) * (doc_c == 0)                 # decay from the chunk start, incoming doc only
        self.f_c = jnp.exp(gam_L - gam_c) * (doc_c == doc_L)     # decay to the chunk end, last doc only
        self.s_dec = jnp.exp(gam_L) * (doc_L == 0)               # [1, 1] decay of the incoming state
        self.B = jnp.where(self.Ms, keys.KK * self.D, 0.0)
        self.Tinv = _unit_lower_inverse(self.B * beta_c, keys.ii, keys.jj, bf16x3=keys.bf16)
        self.vb = self.v * beta_c
        self.kw = keys.k * (beta_c * self.e_c)
        self.U = mm(self.Tinv, self.vb)
        self.W = mm(self.Tinv, self.kw)
        self.P = keys.QK * self.D


def _scalars(gam_ref, beta_ref, doc_ref, j, n):
    """[1, C] rows of value head j, chunk n: in-chunk cumulative log decay, beta, chunk-local document number."""
    return gam_ref[j, pl.ds(n, 1), :], beta_ref[j, pl.ds(n, 1), :], doc_ref[pl.ds(n, 1), :]


# ----------------------------------------------------------------------------------------------------- kernels
def _forward_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, s0_ref, *refs, scale, l2norm, emit, r, lv,
                    bf16):
    """One chunk of one key head and its r value heads. emit "output": o and the final state; "states": the
    chunk-start state of every chunk (the backward's only stored intermediate)."""
    if emit == "output":
        o_ref, sT_ref, S_scr = refs
    else:
        states_ref, S_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        S_scr[...] = s0_ref[...].astype(jnp.float32)

    mm = functools.partial(_dot, bf16=bf16)
    keys = _Keys(q_ref, k_ref, scale=scale, l2norm=l2norm, mm=mm, bf16=bf16)
    for j in range(r):
        hd = _Head(keys, lv.get(v_ref, j), *_scalars(gam_ref, beta_ref, doc_ref, j, n))
        S = S_scr[j]
        Vn = hd.U - mm(hd.W, S)
        S_next = hd.s_dec * S + mm(keys.k * hd.f_c, Vn, _TN)
        S_scr[j] = S_next
        if emit == "output":
            lv.set(o_ref, j, (mm(keys.q * hd.e_c, S) + mm(hd.P, Vn)).astype(o_ref.dtype))

            @pl.when(n == pl.num_programs(2) - 1)
            def _final():
                sT_ref[j] = S_next  # noqa: B023
        else:
            states_ref[j] = S


def _backward_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, doc_ref, states_ref, do_ref, dsT_ref,
                     dq_ref, dk_ref, dv_ref, dgam_ref, dbeta_ref, ds0_ref, dS_scr, *, scale, l2norm, r, lv, bf16):
    i, N = pl.program_id(2), pl.num_programs(2)
    n = N - 1 - i

    @pl.when(i == 0)
    def _init():
        dS_scr[...] = dsT_ref[...].astype(jnp.float32)

    mm = functools.partial(_dot, bf16=bf16)
    keys = _Keys(q_ref, k_ref, scale=scale, l2norm=l2norm, mm=mm, bf16=bf16)
    k = keys.k
    dq = jnp.zeros_like(keys.q)
    dk = jnp.zeros_like(k)
    for j in range(r):
        hd = _Head(keys, lv.get(v_ref, j), *_scalars(gam_ref, beta_ref, doc_ref, j, n))
        S, dS_next, dO = states_ref[j], dS_scr[j], lv.get(do_ref, j).astype(jnp.float32)
        Vn = hd.U - mm(hd.W, S)
        Kd, Qd = k * hd.f_c, keys.q * hd.e_c
        dVn = mm(hd.P, dO, _TN) + mm(Kd, dS_next)            # O = Qd S + P Vn; S' = s_dec S + Kd^T Vn
        dP = mm(dO, Vn, _NT)
        dQd = mm(dO, S, _NT)
        dKd = mm(Vn, dS_next, _NT)
        dS_scr[j] = mm(Qd, dO, _TN) - mm(hd.W, dVn, _TN) + hd.s_dec * dS_next   # Vn = U - W S
        dW = -mm(dVn, S, _NT)
        dvb = mm(hd.Tinv, dVn, _TN)                              # U = Tinv vb; W = Tinv kw
        dkw = mm(hd.Tinv, dW, _TN)
        dTinv = mm(dVn, hd.vb, _NT) + mm(dW, hd.kw, _NT)
        dA = jnp.where(hd.Ms, -mm(mm(hd.Tinv, dTinv, _TN), hd.Tinv, _NT), 0.0)   # Tinv = (I + A)^-1
        dB = dA * hd.beta_c                                        # A = diag(beta) B, B = Ms * KK * D
        dKK = dB * hd.D
        dD = dB * keys.KK + dP * keys.QK                           # P = QK * D
        dQK = dP * hd.D
        dq = dq + mm(dQK, k) + hd.e_c * dQd
        dk = (dk + mm(dQK, keys.q, _TN) + mm(dKK, k) + mm(dKK, k, _TN) + (hd.beta_c * hd.e_c) * dkw
              + hd.f_c * dKd)
        lv.set(dv_ref, j, (hd.beta_c * dvb).astype(dv_ref.dtype))
        kdkw = jnp.sum(dkw * k, axis=1, keepdims=True)
        dbeta_c = (jnp.sum(dA * hd.B, axis=1, keepdims=True) + jnp.sum(dvb * hd.v, axis=1, keepdims=True)
                   + hd.e_c * kdkw)
        # gamma reaches e (decay from the chunk start), f (to the chunk end), the state decay and D
        de_e = (jnp.sum(dQd * keys.q, axis=1, keepdims=True) + hd.beta_c * kdkw) * hd.e_c
        df_f = jnp.sum(dKd * k, axis=1, keepdims=True) * hd.f_c
        Z = jnp.where(hd.M, dD * hd.D, 0.0)
        dgam_c = de_e - df_f + jnp.sum(Z, axis=1, keepdims=True) - _col(jnp.sum(Z, axis=0, keepdims=True), keys.eye)
        dlast = jnp.sum(df_f, axis=0, keepdims=True) + hd.s_dec * jnp.sum(
            jnp.sum(S * dS_next, axis=1, keepdims=True), axis=0, keepdims=True)
        dgam_r = _row(dgam_c, keys.eye)
        dgam_ref[j, pl.ds(n, 1), :] = dgam_r + jnp.where(keys.jj[:1] == keys.C - 1, dlast, 0.0)
        dbeta_ref[j, pl.ds(n, 1), :] = _row(dbeta_c, keys.eye)

        @pl.when(i == N - 1)
        def _final():
            ds0_ref[j] = dS_scr[j]  # noqa: B023
    # q = scale * l2norm(q_raw), k = l2norm(k_raw): dx = r (dx_hat - x_hat (x_hat . dx_hat))
    dq = dq * scale
    if l2norm:
        dq = keys.rq * (dq - keys.q_hat * jnp.sum(keys.q_hat * dq, axis=1, keepdims=True))
        dk = keys.rk * (dk - k * jnp.sum(k * dk, axis=1, keepdims=True))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


# ------------------------------------------------------------------------------------------------- pallas calls
class _Layout:
    """How a [B, T, H, d] tensor is presented to the kernels; a block holds `heads` consecutive heads of one chunk.

    Lane-dense (d a multiple of 128): [B, T, H * d] as is, block [C, heads * d], head j at lanes j*d:(j+1)*d.
    Otherwise head-major [B, H, T, d] (one transpose), block [heads, C, d].
    """

    def __init__(self, d: int, C: int, heads: int):
        self.d, self.C, self.heads, self.lane_dense = d, C, heads, d % 128 == 0

    def to_kernel(self, x):
        B, T, H, d = x.shape
        return x.reshape(B, T, H * d) if self.lane_dense else jnp.swapaxes(x, 1, 2)

    def from_kernel(self, x, H):
        if self.lane_dense:
            return x.reshape(x.shape[0], x.shape[1], H, self.d)
        return jnp.swapaxes(x, 1, 2)

    def shape(self, B, T, H):
        return (B, T, H * self.d) if self.lane_dense else (B, H, T, self.d)

    def spec(self, chunk):
        if self.lane_dense:
            return pl.BlockSpec((None, self.C, self.heads * self.d), lambda b, h, n: (b, chunk(n), h))
        heads = None if self.heads == 1 else self.heads  # one head: squeezed, the kernel sees [C, d]
        return pl.BlockSpec((None, heads, self.C, self.d), lambda b, h, n: (b, h, chunk(n), 0))

    def get(self, ref, j):
        if self.heads == 1:
            return ref[...]
        return ref[:, j * self.d:(j + 1) * self.d] if self.lane_dense else ref[j]

    def set(self, ref, j, value):
        if self.heads == 1:
            ref[...] = value
        elif self.lane_dense:
            ref[:, j * self.d:(j + 1) * self.d] = value
        else:
            ref[j] = value


def _flops_per_chunk(C, dk, dv, r, backward: bool):
    """Per key head and its r value heads (the kernel's own count, matmuls only)."""
    keys = 2 * C * C * dk * 2                                                   # K K^T, Q K^T
    inverse = 4 * C ** 3 * max(C.bit_length() - 2, 0)                           # 2 matmuls per doubling level
    head = inverse + 2 * C * C * (dk + dv) + 2 * C * dk * dv * 3 + 2 * C * C * dv  # W, U, WS, QS, K^T Vn, P Vn
    if not backward:
        return keys + r * head
    # recompute (head without the output products) + 12 [C, d]-sized and 2 inverse-sized products per head
    return keys + r * (head + 2 * C * (C * (5 * dv + 4 * dk) + 3 * dk * dv) + 4 * C ** 3) + 2 * C * C * dk * 2


def kernel_cost(B, T, Hk, Hv, dk, dv, *, chunk_size=64, itemsize=2, backward=False) -> dict:
    """The kernels' own cost model: {"flops", "inverse_flops" (the fp32 triangular inverse's share), "bytes" (HBM)}
    of the forward kernel, or of the backward's two kernels (chunk-state pass + reverse walk); T a multiple of
    chunk_size. q, k, v (and do) have `itemsize` bytes; per-token scalars, states and gradients are fp32."""
    C, r = chunk_size, Hv // Hk
    N = T // C
    qkv = B * T * (2 * Hk * dk + Hv * dv) * itemsize
    scalars = B * T * (2 * Hv + 1) * 4
    state = B * Hv * dk * dv * 4
    flops = B * Hk * N * _flops_per_chunk(C, dk, dv, r, False)
    inverse = B * Hv * N * 4 * C ** 3 * max(C.bit_length() - 2, 0)
    if not backward:
        return {"flops": flops, "inverse_flops": inverse,
                "bytes": qkv + scalars + state + B * T * Hv * dv * itemsize + state}
    states = B * Hv * N * dk * dv * 4
    fwd_states = qkv + scalars + state + states
    grads = B * T * (2 * Hk * dk + Hv * dv) * 4 + B * T * Hv * 8 + state
    bwd = qkv + scalars + states + B * T * Hv * dv * itemsize + state + grads
    return {"flops": flops + B * Hk * N * _flops_per_chunk(C, dk, dv, r, True), "inverse_flops": 2 * inverse,
            "bytes": fwd_states + bwd}


def _compiler_params(C, dk, dv, N, r):
    lanes = lambda n: -(-n // 128) * 128  # noqa: E731
    blocks = 2 * 4 * C * (2 * lanes(dk) + 3 * r * lanes(dv)) + 2 * 4 * (2 * r + 3) * N * lanes(C)
    states = 4 * 4 * r * dk * lanes(dv)
    temps = 4 * (40 * C * lanes(C) + 24 * C * lanes(max(dk, dv)))
    limit = int(min(max(2 * (blocks + states + temps), 32 * 1024 * 1024), _VMEM_CAP))
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def _specs(N, C, r, dk, dv, chunk):
    rows = pl.BlockSpec((None, r, N, C), lambda b, h, n: (b, h, 0, 0))
    doc = pl.BlockSpec((None, N, C), lambda b, h, n: (b, 0, 0))
    state = pl.BlockSpec((None, r, dk, dv), lambda b, h, n: (b, h, 0, 0))
    states = pl.BlockSpec((None, r, None, dk, dv), lambda b, h, n: (b, h, chunk(n), 0, 0))
    return rows, doc, state, states


def _forward_call(q, k, v, gam, beta, doc, s0, cfg, *, emit):
    """q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; gam, beta [B, Hv, N, C]; doc [B, N, C]; s0 [B, Hv, dk, dv]."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C, r = cfg["C"], Hv // Hk
    N = T // C
    lk, lv = _Layout(dk, C, 1), _Layout(dv, C, r)
    fwd = lambda n: n  # noqa: E731
    rows, doc_spec, state, states = _specs(N, C, r, dk, dv, fwd)
    in_specs = [lk.spec(fwd), lk.spec(fwd), lv.spec(fwd), rows, rows, doc_spec, state]
    if emit == "output":
        out_shape = [jax.ShapeDtypeStruct(lv.shape(B, T, Hv), v.dtype),
                     jax.ShapeDtypeStruct((B, Hv, dk, dv), jnp.float32)]
        out_specs = [lv.spec(fwd), state]
        out_bytes = v.nbytes + B * Hv * dk * dv * 4
    else:
        out_shape = [jax.ShapeDtypeStruct((B, Hv, N, dk, dv), jnp.float32)]
        out_specs = [states]
        out_bytes = B * Hv * N * dk * dv * 4
    kernel = functools.partial(_forward_kernel, scale=cfg["scale"], l2norm=cfg["l2norm"], emit=emit, r=r, lv=lv,
                               bf16=cfg["bf16"])
    in_bytes = q.nbytes + k.nbytes + v.nbytes + gam.nbytes + beta.nbytes + doc.nbytes + s0.nbytes
    flops = B * Hk * N * _flops_per_chunk(C, dk, dv, r, False)
    cost = pl.CostEstimate(flops=flops, transcendentals=B * Hv * T * (C + 3), bytes_accessed=in_bytes + out_bytes)
    out = pl.pallas_call(
        kernel, grid=(B, Hk, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((r, dk, dv), jnp.float32)],
        compiler_params=_compiler_params(C, dk, dv, N, r), cost_estimate=cost, interpret=cfg["interpret"],
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), gam, beta, doc, s0)
    if emit == "output":
        return lv.from_kernel(out[0], Hv), out[1]
    return out[0]


def _backward_call(q, k, v, gam, beta, doc, states, do, dsT, cfg):
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C, r = cfg["C"], Hv // Hk
    N = T // C
    lk, lv = _Layout(dk, C, 1), _Layout(dv, C, r)
    rev = lambda n: N - 1 - n  # noqa: E731
    rows, doc_spec, state, states_spec = _specs(N, C, r, dk, dv, rev)
    in_specs = [lk.spec(rev), lk.spec(rev), lv.spec(rev), rows, rows, doc_spec, states_spec, lv.spec(rev), state]
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    out_shape = [f32(lk.shape(B, T, Hk)), f32(lk.shape(B, T, Hk)), f32(lv.shape(B, T, Hv)), f32((B, Hv, N, C)),
                 f32((B, Hv, N, C)), f32((B, Hv, dk, dv))]
    out_specs = [lk.spec(rev), lk.spec(rev), lv.spec(rev), rows, rows, state]
    kernel = functools.partial(_backward_kernel, scale=cfg["scale"], l2norm=cfg["l2norm"], r=r, lv=lv,
                               bf16=cfg["bf16"])
    in_bytes = (q.nbytes + k.nbytes + v.nbytes + gam.nbytes + beta.nbytes + doc.nbytes + states.nbytes + do.nbytes
                + dsT.nbytes)
    out_bytes = 4 * B * T * (2 * Hk * dk + Hv * dv) + 8 * gam.size + 4 * B * Hv * dk * dv
    cost = pl.CostEstimate(flops=B * Hk * N * _flops_per_chunk(C, dk, dv, r, True),
                           transcendentals=B * Hv * T * (C + 3), bytes_accessed=in_bytes + out_bytes)
    dq, dk_, dv_, dgam, dbeta, ds0 = pl.pallas_call(
        kernel, grid=(B, Hk, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((r, dk, dv), jnp.float32)],
        compiler_params=_compiler_params(C, dk, dv, N, r), cost_estimate=cost, interpret=cfg["interpret"],
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), gam, beta, doc, states, lv.to_kernel(do), dsT)
    return lk.from_kernel(dq, Hk), lk.from_kernel(dk_, Hk), lv.from_kernel(dv_, Hv), dgam, dbeta, ds0


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
                            segment_ids=None, use_qk_l2norm=False, chunk_size=64, interpret=None, mxu="auto"):
    """The chunked gated delta rule as fused Pallas TPU kernels (interpret mode off TPU by default).

    mxu: "f32" (every product with fp32 operands, HIGHEST), "bf16" (bf16 operands and fp32 accumulation; the
    triangular inverse in three bf16 passes, about fp32-accurate), "auto" (bf16 when q, k and v are all bf16).
    """
    if mxu not in ("auto", "f32", "bf16"):
        raise ValueError(f"mxu must be 'auto', 'f32' or 'bf16'; got {mxu!r}")
    if mxu == "auto":
        mxu = "bf16" if q.dtype == k.dtype == v.dtype == jnp.bfloat16 else "f32"
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    if interpret is None:
        interpret = not target.on_tpu()
    scale = dk ** -0.5 if scale is None else float(scale)
    starts = document_starts(segment_ids, B, T)
    if pad:  # zero q, k, v and g = beta = 0 make the padding exact; it continues the last document
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, g, beta, starts = map(padt, (q, k, v, g, beta, starts))
    doc = jnp.cumsum(starts.reshape(B, N, C).astype(jnp.int32), axis=-1).astype(jnp.float32)   # chunk-local doc
    rows = lambda x: jnp.moveaxis(x.astype(jnp.float32).reshape(B, N, C, Hv), 3, 1)  # noqa: E731  [B, Hv, N, C]
    gam = jnp.cumsum(rows(g), axis=-1)
    s0 = jnp.zeros((B, Hv, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    cfg = (("C", C), ("scale", scale), ("l2norm", bool(use_qk_l2norm)), ("interpret", interpret),
           ("bf16", mxu == "bf16"))
    o, sT = _gdn(q, k, v, gam, rows(beta), doc, s0, cfg)
    return o[:, :T], (sT if output_final_state else None)
