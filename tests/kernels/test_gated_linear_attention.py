"""Gated linear attention (decay only; g = 0: plain linear attention): the chunked form against the float64
per-token recurrence, which is checked against the textbook update; values, final states and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunk_gated_linear_attention
from pallas_kernels.gated_linear_attention import (recurrent_gated_linear_attention,
                                                   recurrent_gated_linear_attention_states)


def inputs(decay, B=2, T=23, Hk=1, Hv=2, dk=4, dv=3):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, B, T, Hk, dk))
    v = rng.normal(size=(B, T, Hv, dv))
    g = -rng.uniform(0.0, 1.5, size=(B, T, Hv)) if decay else np.zeros((B, T, Hv))
    return q, k, v, g, rng.normal(size=(B, Hv, dk, dv))


@pytest.mark.parametrize("decay", [False, True], ids=["linear", "gla"])
def test_chunked_matches_recurrence(decay):
    with jax.enable_x64(True):
        q, k, v, g, s0 = inputs(decay)
        B, T, Hk, dk = q.shape
        Hv = v.shape[2]
        seg = np.array([[1] * 5 + [2] * 12 + [3] * 6, [1] * 23])
        kw = dict(initial_state=s0, output_final_state=True, segment_ids=seg, use_qk_l2norm=True)
        o_ref, s_ref = jax.jit(lambda *a: recurrent_gated_linear_attention(*a, **kw))(q, k, v, g)
        for C in (4, 64):  # several chunks with a padded tail; one chunk
            o, s = jax.jit(lambda *a: chunk_gated_linear_attention(*a, chunk_size=C, impl="xla", **kw))(q, k, v, g)
            np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)
        # and the reference is the textbook recurrence (row 1: one document, zero initial state)
        o_row = recurrent_gated_linear_attention(q, k, v, g, use_qk_l2norm=True)[0][1]
        qn, kn = (np.repeat(x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6), Hv // Hk, 1) for x in (q[1], k[1]))
        S = np.zeros((Hv, dk, v.shape[-1]))
        for t in range(T):
            S = np.exp(g[1, t])[:, None, None] * S + np.einsum("hk,hv->hkv", kn[t], v[1, t])
            np.testing.assert_allclose(o_row[t], np.einsum("hkv,hk->hv", S, qn[t] * dk ** -0.5), rtol=1e-12)


@pytest.mark.parametrize("decay", [False, True], ids=["linear", "gla"])
def test_chunked_gradients_match_recurrence(decay):
    with jax.enable_x64(True):
        q, k, v, g, s0 = inputs(decay, T=13)
        seg = np.array([[1] * 6 + [2] * 7, [1] * 13])
        w = np.random.default_rng(1).normal(size=v.shape)

        def loss(fn, *args):
            o, s = fn(*args, segment_ids=seg, use_qk_l2norm=True, output_final_state=True)
            return jnp.sum(o * w) + jnp.sum(s ** 2)

        chunked = lambda q, k, v, g, s0, **kw: chunk_gated_linear_attention(  # noqa: E731
            q, k, v, g, initial_state=s0, chunk_size=4, **kw)
        recurrent = lambda q, k, v, g, s0, **kw: recurrent_gated_linear_attention(  # noqa: E731
            q, k, v, g, initial_state=s0, **kw)
        argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 4)
        want = jax.grad(lambda *a: loss(recurrent, *a), argnums)(q, k, v, g, s0)
        got = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums))(q, k, v, g, s0)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_states_are_the_recurrence_after_each_token():
    with jax.enable_x64(True):
        q, k, v, g, s0 = inputs(True, T=5)
        o, states = recurrent_gated_linear_attention_states(q, k, v, g, initial_state=s0, use_qk_l2norm=True)
        for t in range(5):
            o_t, s_t = recurrent_gated_linear_attention(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], g[:, :t + 1],
                                                        initial_state=s0, output_final_state=True,
                                                        use_qk_l2norm=True)
            np.testing.assert_allclose(states[:, t], s_t, rtol=1e-12)
            np.testing.assert_allclose(o[:, t], o_t[:, t], rtol=1e-12)


def test_bad_impl_and_shapes_are_named():
    q, k, v, g, _ = inputs(True, T=4)
    with pytest.raises(ValueError, match="no Pallas kernel"):
        chunk_gated_linear_attention(q, k, v, g, impl="pallas")
    with pytest.raises(ValueError, match=r"g must be \[B, T, Hv\]"):
        chunk_gated_linear_attention(q, k, v, g[:, :, :1])
