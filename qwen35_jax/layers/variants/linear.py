"""Linear-attention ablation siblings of Gated DeltaNet: the same block, only the state update differs.

Every variant keeps the Gated DeltaNet block (see `layers/gdn.py`): `in_proj_qkv`, causal depthwise conv + SiLU,
L2-normalised q and k (scaled by dk**-0.5), the per-head output RMSNorm gated by `silu(z)`, `out_proj`, and the
`gdn_*` head counts and dims. Per value head with state S [dk, dv]:
  linear    S = S + k v^T                              plain linear attention (no decay, no delta rule)
  gla       S = exp(g) S + k v^T                       scalar-decay gated linear attention (Mamba2 / RetNet style)
  deltanet  S = S + k (beta (v - S^T k))^T             delta rule without decay (g = 0)
  (gdn      S = exp(g) S, then the delta rule          Qwen3.5's Gated DeltaNet, `layers/gdn.py`)
and o = S^T q. g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b), exactly as in Gated DeltaNet.

Feature map and normalisation of plain linear attention: as in flash-linear-attention's `LinearAttention` with an
output norm, there is no denominator `q . sum(k)` (it is unstable, "The Devil in Linear Transformer"); the feature map
is the block's conv + SiLU + L2 norm, and the output RMSNorm fixes the scale. This keeps the comparison to one factor.

The delta rules run on `pallas_kernels.chunk_gated_delta_rule`; the non-delta rules on the small chunked form below,
checked against its per-token recurrence in the tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.reference import document_starts, l2norm
from qwen35_jax.layers.common import accum_dtype, dense, dtypes, param
from qwen35_jax.layers.gdn import (DECODE_RECURRENT_MAX, GatedDeltaNet, a_log_init, causal_depthwise_conv, conv_init,
                                  dt_bias_init)
from qwen35_jax.layers.norms import GatedRMSNorm

HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------------------
# Gated linear attention with a scalar decay per head (no delta rule): reference recurrence and chunked form


def _prepare(q, k, v, g, scale, use_qk_l2norm):
    """Accumulation dtype, optional l2norm, q scaled, key heads repeated to the value heads (repeat-interleave)."""
    acc = jnp.promote_types(v.dtype, jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    r = v.shape[2] // q.shape[2]
    q = jnp.repeat(q.astype(acc), r, axis=2) * scale
    return q, jnp.repeat(k.astype(acc), r, axis=2), v.astype(acc), g.astype(acc), acc


def recurrent_gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                                     segment_ids=None, use_qk_l2norm=False):
    """Per-token reference: `S = exp(g_t) S + k_t v_t^T; o_t = S^T (scale q_t)`, state reset at each new document.

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g [B, T, Hv] (log decay <= 0; zeros give plain linear attention).
    Returns (o [B, T, Hv, dv] in v's dtype, final state [B, Hv, dk, dv] or None).
    """
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, acc = _prepare(q, k, v, g, scale, use_qk_l2norm)
    S0 = jnp.zeros((B, Hv, q.shape[-1], dv), acc) if initial_state is None else initial_state.astype(acc)
    starts = document_starts(segment_ids, B, T)

    def step(S, xs):
        q_t, k_t, v_t, g_t, start = xs
        S = jnp.where(start[:, None, None, None], 0.0, S) * jnp.exp(g_t)[..., None, None]
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)

    S, o = jax.lax.scan(step, S0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, starts)))
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), (S if output_final_state else None)


def chunk_gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                                 segment_ids=None, use_qk_l2norm=False, chunk_size=64):
    """Chunked form of `recurrent_gated_linear_attention` (same arguments and returns).

    Per chunk with in-chunk cumulative log decay gamma and D[i, j] = exp(gamma_i - gamma_j) (i >= j, same document):
    O = (Q exp(gamma)) S + (Q K^T * D) V;  S = exp(gamma_last) S + (K exp(gamma_last - gamma))^T V.
    The incoming state reaches only tokens of the chunk's first document; only its last document updates S.
    """
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, acc = _prepare(q, k, v, g, scale, use_qk_l2norm)
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


# ---------------------------------------------------------------------------------------------------------------
# The block


class LinearAttentionBlock(nn.Module):
    """The Gated DeltaNet block with a switchable state update: `decay` (scalar gate g) and `delta` (delta rule).

    Both on is Gated DeltaNet itself (same parameter names; the tests check it matches `GatedDeltaNet`). Called like
    every mixer: `(x_BTD, segment_ids_BT=..., positions_BT=...)` -> y_BTD, or (y_BTD, cache) with a decode cache.
    """

    cfg: object
    decay: bool = True
    delta: bool = True

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids_BT, positions_BT=None, cache=None, cache_index=None):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        B, T, _ = x_BTD.shape
        Hk, Hv, dk, dv = cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim
        proj = lambda n, axes, name: dense(n, axes, dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                                           std=cfg.initializer_range, name=name)
        x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0).astype(dtype)
        qkv_BTC = proj(cfg.gdn_conv_dim, ("embed", "heads"), "in_proj_qkv")(x_BTD)
        z_BTHV = proj(Hv * dv, ("embed", "heads"), "in_proj_z")(x_BTD).reshape(B, T, Hv, dv)
        f32 = accum_dtype(dtype)
        g_BTH = jnp.zeros((B, T, Hv), f32)
        if self.delta:
            beta_BTH = jax.nn.sigmoid(proj(Hv, ("embed", "heads"), "in_proj_b")(x_BTD))
        if self.decay:
            a_BTH = proj(Hv, ("embed", "heads"), "in_proj_a")(x_BTD)
        kernel_KC = param(self, "conv1d", conv_init, (cfg.gdn_conv_kernel, cfg.gdn_conv_dim), param_dtype,
                          ("conv", "heads"))
        if cache is None:
            conv_BTC = causal_depthwise_conv(qkv_BTC.astype(f32), kernel_KC.astype(f32), segment_ids_BT)
        else:  # continue from the last K-1 pre-conv columns of this sequence
            window = jnp.concatenate([cache["conv"].astype(f32), qkv_BTC.astype(f32)], axis=1)
            conv_BTC = causal_depthwise_conv(window, kernel_KC.astype(f32), jnp.ones(window.shape[:2], jnp.int32))
            conv_BTC = conv_BTC[:, -T:]
            new_conv = window[:, -(cfg.gdn_conv_kernel - 1):].astype(cache["conv"].dtype)
        qkv_BTC = jax.nn.silu(conv_BTC).astype(dtype)
        q_BTHK = qkv_BTC[..., : Hk * dk].reshape(B, T, Hk, dk)
        k_BTHK = qkv_BTC[..., Hk * dk: 2 * Hk * dk].reshape(B, T, Hk, dk)
        v_BTHV = qkv_BTC[..., 2 * Hk * dk:].reshape(B, T, Hv, dv)
        if self.decay:
            dt_bias = param(self, "dt_bias", dt_bias_init, (Hv,), param_dtype, ("heads",))
            A_log = param(self, "A_log", a_log_init, (Hv,), param_dtype, ("heads",))
            g_BTH = -jnp.exp(A_log.astype(f32)) * jax.nn.softplus(a_BTH.astype(f32) + dt_bias.astype(f32))
        step_by_step = cache is not None and T <= DECODE_RECURRENT_MAX
        kwargs = dict(use_qk_l2norm=True, chunk_size=cfg.gdn_chunk_size)
        if cache is None:
            kwargs["segment_ids"] = segment_ids_BT
        else:
            kwargs.update(initial_state=cache["state"], output_final_state=True)
        if self.delta:
            impl = "recurrent" if step_by_step else cfg.gdn_impl
            o_BTHV, state = chunk_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, impl=impl, **kwargs)
        elif step_by_step:
            kwargs.pop("chunk_size")
            o_BTHV, state = recurrent_gated_linear_attention(q_BTHK, k_BTHK, v_BTHV, g_BTH, **kwargs)
        else:
            o_BTHV, state = chunk_gated_linear_attention(q_BTHK, k_BTHK, v_BTHV, g_BTH, **kwargs)
        y_BTHV = GatedRMSNorm(cfg.rms_norm_eps, param_dtype, name="norm")(o_BTHV.astype(dtype), z_BTHV)
        y = proj(cfg.hidden_size, ("heads", "embed"), "out_proj")(y_BTHV.reshape(B, T, Hv * dv))
        return y if cache is None else (y, {"conv": new_conv, "state": state})

    # The registered variants below fix `decay` and `delta`; these read them from the class defaults.
    @classmethod
    def num_params(cls, cfg) -> int:
        D, Hv, dv, C = cfg.hidden_size, cfg.gdn_num_value_heads, cfg.gdn_value_dim, cfg.gdn_conv_dim
        gates = D * Hv * (cls._default("delta") + cls._default("decay")) + 2 * Hv * cls._default("decay")
        return D * C + D * Hv * dv + gates + cfg.gdn_conv_kernel * C + dv + Hv * dv * D

    @classmethod
    def sequence_flops(cls, cfg, seq_len: int) -> float:
        """Forward FLOPs per token: delta rules as Gated DeltaNet; otherwise Q K^T and P V in the chunk plus the two
        state products (Q S, K^T V)."""
        if cls._default("delta"):
            return GatedDeltaNet.sequence_flops(cfg, seq_len)
        C, dk, dv = min(cfg.gdn_chunk_size, seq_len), cfg.gdn_key_dim, cfg.gdn_value_dim
        return cfg.gdn_num_value_heads * (2.0 * C * (dk + dv) + 4.0 * dk * dv)

    @staticmethod
    def state_size(cfg, seq_len: int) -> int:
        return GatedDeltaNet.state_size(cfg, seq_len)

    init_cache = staticmethod(GatedDeltaNet.init_cache)

    @classmethod
    def _default(cls, field: str) -> int:
        return int(cls.__dataclass_fields__[field].default)


class LinearAttention(LinearAttentionBlock):
    """Plain linear attention: S = S + k v^T."""

    decay: bool = False
    delta: bool = False


class GatedLinearAttention(LinearAttentionBlock):
    """Scalar-decay gated linear attention (Mamba2 / RetNet style): S = exp(g) S + k v^T."""

    decay: bool = True
    delta: bool = False


class DeltaNet(LinearAttentionBlock):
    """DeltaNet: the delta rule without decay (g = 0)."""

    decay: bool = False
    delta: bool = True
