"""The per-token gated linear attention (no delta rule): the reference (float64-capable), the decode path, and the
recurrence that returns the state after every token (speculative verification's checkpoints).

Per value head h with state S [dk, dv]:  S = exp(g_t) S + k_t v_t^T;  o_t = S^T (scale * q_t).
g = 0 is plain linear attention. Value head h reads key head h // (Hv / Hk); the state restarts at zero where
`segment_ids` changes. The front end (l2norm, scale, grouped heads) is the gated delta rule's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.reference import document_starts, prepare


def prepare_gla(q, k, v, g, *, scale, use_qk_l2norm):
    """The delta rule's front end without beta: (q, k, v, g, accumulation dtype), heads expanded."""
    q, k, v, g, _, acc = prepare(q, k, v, g, g, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return q, k, v, g, acc


def _step(S, q_t, k_t, v_t, g_t):
    S = S * jnp.exp(g_t)[..., None, None] + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
    return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)


def recurrent_gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                                     segment_ids=None, use_qk_l2norm=False):
    """q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g [B, T, Hv] (log decay <= 0). Returns (o [B, T, Hv, dv] in v's dtype,
    final state [B, Hv, dk, dv] in the accumulation dtype, or None)."""
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, acc = prepare_gla(q, k, v, g, scale=scale, use_qk_l2norm=use_qk_l2norm)
    S0 = jnp.zeros((B, Hv, q.shape[-1], dv), acc) if initial_state is None else initial_state.astype(acc)
    starts = document_starts(segment_ids, B, T)

    def step(S, xs):
        q_t, k_t, v_t, g_t, start = xs
        return _step(jnp.where(start[:, None, None, None], 0.0, S), q_t, k_t, v_t, g_t)

    S, o = jax.lax.scan(step, S0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, starts)))
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), (S if output_final_state else None)


def recurrent_gated_linear_attention_states(q, k, v, g, *, scale=None, initial_state=None, use_qk_l2norm=False,
                                            unroll: int | bool = True):
    """As `recurrent_gated_delta_rule_states`: (o [B, T, Hv, dv], states [B, T, Hv, dk, dv], the state after token
    t), steps unrolled by default (a handful of draft tokens), one sequence per row."""
    B, T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k, v, g, acc = prepare_gla(q, k, v, g, scale=scale, use_qk_l2norm=use_qk_l2norm)
    S0 = jnp.zeros((B, Hv, q.shape[-1], dv), acc) if initial_state is None else initial_state.astype(acc)

    def step(S, xs):
        S, o_t = _step(S, *xs)
        return S, (o_t, S)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g))
    _, (o, states) = jax.lax.scan(step, S0, xs, unroll=unroll)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), jnp.moveaxis(states, 0, 1)
