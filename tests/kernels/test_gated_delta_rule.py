"""Every gated-delta-rule implementation against a float64 recurrence: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunk_gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta_rule import recurrent_gated_delta_rule

IMPLS = ["recurrent", "xla"]


def make_inputs(B, T, Hk, Hv, dk, dv, seed=0, g_scale=1.0, g_const=None):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(B, T, Hk, dk)), rng.normal(size=(B, T, Hk, dk))
    v = rng.normal(size=(B, T, Hv, dv))
    g = -np.abs(rng.normal(size=(B, T, Hv))) * g_scale if g_const is None else np.full((B, T, Hv), g_const)
    beta = 1 / (1 + np.exp(-rng.normal(size=(B, T, Hv))))
    S0 = rng.normal(size=(B, Hv, dk, dv)) * 0.5
    return q, k, v, g, beta, S0


def packed_segments(B, T):
    seg = np.ones((B, T), np.int32)
    if T > 20:
        seg[0, 13:] = 2  # a boundary inside the first 16-token chunk
        seg[0, 40:] = 3
        seg[-1, T // 2:] = 2
    return seg


def reference64(q, k, v, g, beta, **kw):
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, g, beta)]
        if kw.get("initial_state") is not None:
            kw["initial_state"] = jnp.asarray(kw["initial_state"], jnp.float64)
        o, s = recurrent_gated_delta_rule(*args, output_final_state=True, **kw)
        return np.asarray(o), np.asarray(s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("heads", [(2, 2), (1, 4)], ids=["Hv=Hk", "Hv=4Hk"])
def test_values_against_float64_recurrence(impl, T, heads):
    Hk, Hv = heads
    q, k, v, g, beta, S0 = make_inputs(2, T, Hk, Hv, 16, 12, seed=T)
    seg = packed_segments(2, T)
    kw = dict(use_qk_l2norm=True, initial_state=S0, segment_ids=seg)
    o_ref, s_ref = reference64(q, k, v, g, beta, **kw)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    o, s = chunk_gated_delta_rule(*map(f32, (q, k, v, g, beta)), use_qk_l2norm=True, initial_state=f32(S0),
                                  segment_ids=seg, output_final_state=True, chunk_size=16 if T > 64 else 64,
                                  impl=impl)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, atol=2e-5 * max(1, np.abs(o_ref).max()))
    np.testing.assert_allclose(s, s_ref, atol=2e-5 * max(1, np.abs(s_ref).max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_against_float64_recurrence(impl):
    q, k, v, g, beta, S0 = make_inputs(1, 40, 1, 2, 8, 6, seed=1)
    seg = packed_segments(1, 40)
    w = np.random.default_rng(2).normal(size=(1, 40, 2, 6))

    def loss(fn, dtype):
        def f(q, k, v, g, beta, S0):
            o, s = fn(q, k, v, g, beta, initial_state=S0, segment_ids=seg, use_qk_l2norm=True,
                      output_final_state=True)
            return jnp.sum(o * w.astype(dtype)) + jnp.sum(s ** 2)
        return f

    with jax.enable_x64(True):
        ref = jax.grad(loss(recurrent_gated_delta_rule, jnp.float64), argnums=range(6))(
            *[jnp.asarray(x, jnp.float64) for x in (q, k, v, g, beta, S0)])
        ref = [np.asarray(r) for r in ref]
    fn = lambda *a, **kw: chunk_gated_delta_rule(*a, impl=impl, chunk_size=16, **kw)  # noqa: E731
    got = jax.grad(loss(fn, jnp.float32), argnums=range(6))(*[jnp.asarray(x, jnp.float32)
                                                                for x in (q, k, v, g, beta, S0)])
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], got, ref):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1, np.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g_const", [-20.0, 0.0], ids=["strong-decay", "no-decay"])
def test_extreme_decay_is_finite(impl, g_const):
    q, k, v, g, beta, _ = make_inputs(1, 130, 2, 2, 8, 8, g_const=g_const)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, _ = reference64(q, k, v, g, beta, use_qk_l2norm=True)
    o, _ = chunk_gated_delta_rule(*f32, use_qk_l2norm=True, impl=impl)
    np.testing.assert_allclose(o, o_ref, atol=5e-5 * max(1, np.abs(o_ref).max()))
    grads = jax.grad(lambda *a: jnp.sum(chunk_gated_delta_rule(*a, use_qk_l2norm=True, impl=impl)[0]),
                     argnums=range(5))(*f32)
    assert all(bool(jnp.isfinite(x).all()) for x in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_error_is_bounded(impl):
    q, k, v, g, beta, _ = make_inputs(1, 100, 2, 4, 16, 16, seed=3)
    o_ref, _ = reference64(q, k, v, g, beta, use_qk_l2norm=True)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(g, jnp.float32),
                                                              jnp.asarray(beta, jnp.bfloat16)]
    o, _ = chunk_gated_delta_rule(*bf, use_qk_l2norm=True, impl=impl)
    assert o.dtype == jnp.bfloat16
    err = np.abs(np.asarray(o, np.float64) - o_ref).max() / np.abs(o_ref).max()
    assert err < 3e-2


def test_step_function_continues_a_sequence():
    q, k, v, g, beta, S0 = make_inputs(2, 30, 1, 2, 8, 8, seed=4)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    full, s_full = chunk_gated_delta_rule(*f32, initial_state=jnp.asarray(S0, jnp.float32), output_final_state=True,
                                          use_qk_l2norm=True, chunk_size=8)
    o1, s = chunk_gated_delta_rule(*[x[:, :21] for x in f32], initial_state=jnp.asarray(S0, jnp.float32),
                                   output_final_state=True, use_qk_l2norm=True, chunk_size=8)
    outs = [o1]
    for a, b in [(21, 22), (22, 25), (25, 30)]:  # 1 token, 3 tokens, 5 tokens
        o, s = gated_delta_rule_step(*[x[:, a:b] for x in f32], s, use_qk_l2norm=True)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    np.testing.assert_allclose(s, s_full, atol=1e-5)


def test_shape_errors_name_the_tensor():
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"value heads Hv=3 .* must be a multiple of key heads Hk=2"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, Hv\] = \(1, 8, 4\); got \(1, 7, 4\)"):
        chunk_gated_delta_rule(q, k, v, g, beta[:, :7])
