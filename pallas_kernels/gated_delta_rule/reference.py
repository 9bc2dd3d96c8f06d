"""The per-token gated delta rule: the obviously-correct reference (float64-capable), the decode step, and the
recurrence that returns the state after every token (speculative verification's checkpoints).

Per value head h with state S [dk, dv] (fp32, or fp64 under x64):
    S = exp(g_t) S;  u = S^T k_t;  S = S + k_t (beta_t (v_t - u))^T;  o_t = S^T (scale * q_t)
Value head h reads key head h // (Hv / Hk). The state restarts at zero where `segment_ids` changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2norm(x, eps: float = 1e-6):
    """x * rsqrt(sum(x^2) + eps) over the last axis, in fp32 (or fp64)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare(q, k, v, g, beta, *, scale, use_qk_l2norm):
    """Common front end: l2norm, scale, grouped heads expanded (repeat-interleave), all in the accumulation dtype."""
    acc = jnp.promote_types(v.dtype, jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    dk = q.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    r = v.shape[2] // q.shape[2]
    q = jnp.repeat(q.astype(acc), r, axis=2) * scale
    k = jnp.repeat(k.astype(acc), r, axis=2)
    return q, k, v.astype(acc), g.astype(acc), beta.astype(acc), acc


def document_starts(segment_ids, B: int, T: int):
    """[B, T] bool: True where a new document starts (never at t = 0: the initial state belongs to the first)."""
    if segment_ids is None:
        return jnp.zeros((B, T), bool)
    seg = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                               segment_ids=None, use_qk_l2norm=False):
    """Returns (o [B, T, Hv, dv] in v's dtype, final state [B, Hv, dk, dv] or None)."""
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, beta, acc = prepare(q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q.shape[-1]
    S0 = jnp.zeros((B, Hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    starts = document_starts(segment_ids, B, T)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t, start = xs
        S = jnp.where(start[:, None, None, None], 0.0, S) * jnp.exp(g_t)[..., None, None]
        u = jnp.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - u))
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta, starts))
    S, o = jax.lax.scan(step, S0, xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), (S if output_final_state else None)


def recurrent_gated_delta_rule_states(q, k, v, g, beta, *, scale=None, initial_state=None, use_qk_l2norm=False,
                                      unroll: int | bool = True):
    """The per-token recurrence that keeps every intermediate state (speculative verification: the state after
    each verified token is a checkpoint that rollback selects instead of re-running the accepted prefix).

    Returns (o [B, T, Hv, dv] in v's dtype, states [B, T, Hv, dk, dv] in the accumulation dtype: the state after
    token t). `unroll` (default: fully, T is a handful of draft tokens) fuses the steps into one straight-line
    program. The same arithmetic as `recurrent_gated_delta_rule` (no document restarts: one sequence per row).
    """
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, beta, acc = prepare(q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q.shape[-1]
    S0 = jnp.zeros((B, Hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs
        S = S * jnp.exp(g_t)[..., None, None]
        u = jnp.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - u))
        return S, (jnp.einsum("bhkv,bhk->bhv", S, q_t), S)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    _, (o, states) = jax.lax.scan(step, S0, xs, unroll=unroll)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), jnp.moveaxis(states, 0, 1)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False):
    """Decode 1..N new tokens on a carried state: (o [B, N, Hv, dv], new state)."""
    return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True,
                                      use_qk_l2norm=use_qk_l2norm)
