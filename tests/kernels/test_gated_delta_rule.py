"""Every gated-delta-rule implementation against a float64 recurrence: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunk_gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta_rule import recurrent_gated_delta_rule
from pallas_kernels.gated_delta_rule.chunked import solve_unit_lower, unit_lower_inverse

IMPLS = ["recurrent", "xla", "pallas"]
NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def make_inputs(B, T, Hk, Hv, dk, dv, seed=0, g_const=None):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(B, T, Hk, dk)), rng.normal(size=(B, T, Hk, dk))
    v = rng.normal(size=(B, T, Hv, dv))
    g = -np.abs(rng.normal(size=(B, T, Hv))) if g_const is None else np.full((B, T, Hv), g_const)
    beta = 1 / (1 + np.exp(-rng.normal(size=(B, T, Hv))))
    S0 = rng.normal(size=(B, Hv, dk, dv)) * 0.5
    return q, k, v, g, beta, S0


def packed_segments(B, T):
    """Row 0: boundaries inside a 16-chunk (13), on a chunk start (16), a one-token document (16), and at 40."""
    seg = np.ones((B, T), np.int32)
    for start in (13, 16, 17, 40):
        seg[0, start:] += 1
    if B > 1 and T > 2:
        seg[-1, T // 2:] = 7
    return seg


def loss_fn(fn, seg, w_o, w_s):
    """A scalar of both outputs, so gradients flow through o and the final state."""
    def f(q, k, v, g, beta, S0):
        o, s = fn(q, k, v, g, beta, initial_state=S0, segment_ids=seg, use_qk_l2norm=True, output_final_state=True)
        return jnp.sum(o * w_o.astype(o.dtype)) + jnp.sum(s * w_s.astype(s.dtype)), (o, s)
    return f


@functools.lru_cache(maxsize=None)
def reference64(case):
    """(o, final state, grads) of the float64 recurrence for a test case tuple."""
    T, Hk, Hv, seed = case
    args = make_inputs(2, T, Hk, Hv, 16, 12, seed=seed)
    rng = np.random.default_rng(seed + 1)
    w_o, w_s = rng.normal(size=(2, T, Hv, 12)), rng.normal(size=(2, Hv, 16, 12))
    with jax.enable_x64(True):
        f = loss_fn(recurrent_gated_delta_rule, packed_segments(2, T), w_o, w_s)
        f = jax.jit(jax.grad(f, argnums=range(6), has_aux=True))
        grads, (o, s) = f(*[jnp.asarray(x, jnp.float64) for x in args])
        return args, (w_o, w_s), np.asarray(o), np.asarray(s), [np.asarray(x) for x in grads]


def output64(q, k, v, g, beta):
    with jax.enable_x64(True):
        f = jax.jit(lambda *a: recurrent_gated_delta_rule(*a, use_qk_l2norm=True)[0])
        return np.asarray(f(*[jnp.asarray(x, jnp.float64) for x in (q, k, v, g, beta)]))


def close(got, want, rtol, name):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=rtol * max(1.0, np.abs(want).max()),
                               err_msg=name)


# (T, Hk, Hv, chunk): every T of the issue, Hv = Hk and Hv = 4 Hk, chunk 16 (several chunks, boundaries inside
# chunks) and 64; dk = 16 != dv = 12 everywhere.
CASES = [(1, 1, 4, 16), (63, 2, 2, 64), (64, 1, 4, 64), (65, 2, 2, 16), (200, 1, 4, 16)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,Hk,Hv,chunk", CASES)
def test_values_and_gradients_against_float64_recurrence(impl, T, Hk, Hv, chunk):
    args, (w_o, w_s), o_ref, s_ref, g_ref = reference64((T, Hk, Hv, T))
    fn = functools.partial(chunk_gated_delta_rule, impl=impl, chunk_size=chunk)
    f = jax.jit(jax.grad(loss_fn(fn, packed_segments(2, T), w_o, w_s), argnums=range(6), has_aux=True))
    grads, (o, s) = f(*[jnp.asarray(x, jnp.float32) for x in args])
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    close(o, o_ref, 2e-5, "o")
    close(s, s_ref, 2e-5, "final_state")
    for name, a, b in zip(NAMES, grads, g_ref):
        close(a, b, 1e-4, f"d{name}")


@pytest.mark.parametrize("g_const", [-20.0, 0.0], ids=["strong-decay", "no-decay"])
def test_extreme_decay_is_finite_and_exact(g_const):
    q, k, v, g, beta, _ = make_inputs(1, 130, 2, 2, 8, 8, g_const=g_const)
    o_ref = output64(q, k, v, g, beta)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    for impl in IMPLS:
        fn = lambda *a: chunk_gated_delta_rule(*a, use_qk_l2norm=True, impl=impl, chunk_size=32)[0]  # noqa: B023, E731
        o, grads = jax.jit(lambda *a: (fn(*a), jax.grad(lambda *b: jnp.sum(fn(*b)), argnums=range(5))(*a)))(*f32)
        close(o, o_ref, 5e-5, impl)
        assert all(bool(jnp.isfinite(x).all()) for x in grads), impl


def test_bf16_inputs_error_is_bounded():
    q, k, v, g, beta, _ = make_inputs(1, 100, 2, 4, 16, 16, seed=3)
    o_ref = output64(q, k, v, g, beta)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(g, jnp.float32),
                                                              jnp.asarray(beta, jnp.bfloat16)]
    for impl in IMPLS:
        o = jax.jit(lambda *a: chunk_gated_delta_rule(*a, use_qk_l2norm=True, impl=impl, chunk_size=32)[0])(*bf)  # noqa: B023
        assert o.dtype == jnp.bfloat16
        err = np.abs(np.asarray(o, np.float64) - o_ref).max() / np.abs(o_ref).max()
        assert err < 3e-2, (impl, err)


def test_step_function_continues_a_chunked_sequence():
    q, k, v, g, beta, S0 = make_inputs(2, 30, 1, 2, 8, 8, seed=4)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    S0 = jnp.asarray(S0, jnp.float32)
    chunked = jax.jit(functools.partial(chunk_gated_delta_rule, output_final_state=True, use_qk_l2norm=True,
                                        chunk_size=8, impl="xla"))
    step = jax.jit(functools.partial(gated_delta_rule_step, use_qk_l2norm=True))
    full, s_full = chunked(*f32, initial_state=S0)
    o1, s = chunked(*[x[:, :21] for x in f32], initial_state=S0)
    outs = [o1]
    for a, b in [(21, 22), (22, 25), (25, 30)]:  # 1 token, 3 tokens, 5 tokens
        o, s = step(*[x[:, a:b] for x in f32], s)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    np.testing.assert_allclose(s, s_full, atol=1e-5)


def test_triangular_inverse_is_exact_and_stable():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        for C in (1, 2, 16, 64):
            A = np.tril(rng.normal(size=(3, C, C)), -1)
            X = np.asarray(jax.jit(unit_lower_inverse)(jnp.asarray(A)))
            err = np.abs(X @ (np.eye(C) + A) - np.eye(C)).max()
            assert err < 1e-10 * max(1, np.abs(X).max()), (C, err)
    # the real system: entries bounded by beta |k_i . k_j| <= 1 with l2-normed keys; fp32 residual stays small
    k = rng.normal(size=(64, 32))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    A = np.tril(k @ k.T, -1) * rng.uniform(size=(64, 1))
    X = np.asarray(jax.jit(unit_lower_inverse)(jnp.asarray(A, jnp.float32)), np.float64)
    assert np.isfinite(X).all()
    assert np.abs(X @ (np.eye(64) + A) - np.eye(64)).max() < 1e-4 * max(1, np.abs(X).max())


def test_triangular_solve_gradient_against_float64_solve():
    """`solve_unit_lower`'s hand-written backward (two matmuls per right-hand side) against autodiff of a float64
    dense solve; the strictly upper part of A gets no gradient (the solve never reads it)."""
    rng = np.random.default_rng(9)
    C = 16
    A = np.tril(rng.normal(size=(2, C, C)) * 0.3, -1) + np.triu(rng.normal(size=(2, C, C)), 0)  # upper part: junk
    R1, R2 = rng.normal(size=(2, C, 5)), rng.normal(size=(2, C, 3))
    w1, w2 = rng.normal(size=R1.shape), rng.normal(size=R2.shape)

    def dense(A, R1, R2):
        M = jnp.eye(C) + jnp.tril(A, -1)
        return jnp.sum(jnp.linalg.solve(M, R1) * w1) + jnp.sum(jnp.linalg.solve(M, R2) * w2)

    def ours(A, R1, R2):
        Y1, Y2 = solve_unit_lower(A, (R1, R2))
        return jnp.sum(Y1 * w1) + jnp.sum(Y2 * w2)

    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (A, R1, R2)]
        want = jax.grad(dense, argnums=(0, 1, 2))(*args)
        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(ours(*args), dense(*args), rtol=1e-12)
    for name, a, b in zip(("A", "R1", "R2"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=name)
    assert not np.asarray(got[0])[:, np.triu_indices(C)[0], np.triu_indices(C)[1]].any()


def test_bad_inputs_name_the_tensor():
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"value heads Hv=3 .* must be a multiple of key heads Hk=2"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, Hv\] = \(1, 8, 4\); got \(1, 7, 4\)"):
        chunk_gated_delta_rule(q, k, v, g, beta[:, :7])
    with pytest.raises(ValueError, match=r"v must be \[B=1, T=8, Hv, dv\]; got \(1, 6, 4, 4\)"):
        chunk_gated_delta_rule(q, k, v[:, :6], g, beta)
    with pytest.raises(ValueError, match=r"impl 'cuda' is not one of"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="cuda")
    with pytest.raises(ValueError, match=r"chunk_size must be a power of two"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=48)
    with pytest.raises(ValueError, match=r"impl='pallas' needs chunk_size >= 16"):
        chunk_gated_delta_rule(q, k, v, g, beta, impl="pallas", chunk_size=8)


def test_pallas_lane_dense_layout_at_head_dim_128():
    """d = 128 takes the no-transpose [B, T, H * d] layout (the TPU one); values and gradients against float64."""
    T, Hv = 40, 2
    args = make_inputs(1, T, 1, Hv, 128, 128, seed=6)
    rng = np.random.default_rng(7)
    w_o, w_s = rng.normal(size=(1, T, Hv, 128)), rng.normal(size=(1, Hv, 128, 128))
    seg = packed_segments(1, T)
    with jax.enable_x64(True):
        f64 = jax.jit(jax.grad(loss_fn(recurrent_gated_delta_rule, seg, w_o, w_s), argnums=range(6), has_aux=True))
        want, (o_want, s_want) = f64(*[jnp.asarray(x, jnp.float64) for x in args])
        want, o_want, s_want = [np.asarray(x) for x in want], np.asarray(o_want), np.asarray(s_want)
    fn = functools.partial(chunk_gated_delta_rule, impl="pallas", chunk_size=16)
    f = jax.jit(jax.grad(loss_fn(fn, seg, w_o, w_s), argnums=range(6), has_aux=True))
    got, (o, s) = f(*[jnp.asarray(x, jnp.float32) for x in args])
    close(o, o_want, 2e-5, "o")
    close(s, s_want, 2e-5, "final_state")
    for name, a, b in zip(NAMES, got, want):
        close(a, b, 1e-4, f"d{name}")


def test_pallas_forward_and_backward_compile_for_tpu():
    """Real Mosaic + XLA:TPU compile (no TPU needed) at the Qwen3-Next GDN shape (16 key / 32 value heads, d 128)."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed to compile for TPU on a CPU host")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    one = jax.sharding.SingleDeviceSharding(topo.devices[0])
    B, T, Hk, Hv, d = 1, 4096, 16, 32, 128
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    args = (spec((B, T, Hk, d), jnp.bfloat16), spec((B, T, Hk, d), jnp.bfloat16), spec((B, T, Hv, d), jnp.bfloat16),
            spec((B, T, Hv), jnp.float32), spec((B, T, Hv), jnp.bfloat16), spec((B, Hv, d, d), jnp.float32),
            spec((B, T), jnp.int32))

    def fwd(q, k, v, g, beta, s0, seg):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, use_qk_l2norm=True,
                                      output_final_state=True, impl="pallas", interpret=False)

    def bwd(*a):
        loss = lambda *b: jnp.sum(fwd(*b, a[-1])[0].astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=range(6))(*a[:-1])

    compiled = jax.jit(fwd).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().output_size_in_bytes >= B * T * Hv * d * 2 + B * Hv * d * d * 4
    compiled = jax.jit(bwd).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 2  # the chunk-state pass and the backward kernel
    # the backward stores one fp32 state per chunk (plus fp32 gradients), never per-token states
    temps = compiled.memory_analysis().temp_size_in_bytes
    assert temps < B * Hv * (T // 64) * d * d * 4 * 3, temps
