"""Attention without the [T, S] matrix (blocked XLA, splash) against the dense float64 reference: values and
gradients, packed documents, sliding window, GQA, local queries at an offset (context parallelism)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (blocked_attention, dense_attention, flash_attention, reference_attention,
                                            resolve_impl)


def make_inputs(B, T, S, H, G, K, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, H, K)), rng.normal(size=(B, S, G, K)), rng.normal(size=(B, S, G, K)),
            rng.normal(size=(B, T, H, K)))


def packed(B, S):
    """Row 0: documents starting at 11, 30 (a block edge at block 8/16 is crossed) and a one-token document at 45;
    row 1: four leading padding tokens (segment 0, which only sees padding)."""
    seg = np.ones((B, S), np.int32)
    for start in (11, 30, 45, 46):
        seg[0, start:] += 1
    seg[1, :4] = 0
    return seg


def grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("window, offset, T, bq, bk", [
    (0, 0, 53, 8, 16),      # full causal, blocks that do not divide T
    (7, 0, 53, 16, 8),      # sliding window narrower than a block: whole blocks skipped on both sides
    (0, 24, 21, 8, 8),      # local queries 24..44 against all 53 keys (a context-parallel shard)
    (9, 32, 21, 4, 16),     # both
])
def test_blocked_matches_float64_reference(window, offset, T, bq, bk):
    S = 53
    seg = packed(2, S)
    q, k, v, w = make_inputs(2, S, S, 4, 2, 8)
    q, w, qseg = q[:, offset:offset + T], w[:, offset:offset + T], seg[:, offset:offset + T]
    with jax.enable_x64(True):
        ref = lambda q, k, v: reference_attention(q, k, v, qseg, seg, q_offset=offset, sliding_window=window)  # noqa: E731
        want, want_g = ref(q, k, v), grads(ref, q, k, v, w)
        blk = jax.jit(lambda q, k, v, off: blocked_attention(q, k, v, qseg, seg, q_offset=off, sliding_window=window,
                                                             block_q=bq, block_k=bk))
        got, got_g = blk(q, k, v, offset), grads(lambda *a: blk(*a, offset), q, k, v, w)
    assert max_rel(got, want) < 1e-12
    for a, b in zip(got_g, want_g):
        assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("window, offset, T, bq", [
    (0, 0, 53, 16),     # causal skipping, blocks that do not divide T
    (7, 0, 53, 8),      # sliding window narrower than a block: keys before the window skipped as well
    (20, 0, 53, 8),     # window wider than a block
    (0, 24, 21, 8),     # local queries 24..44 against all 53 keys (static offset: blocks skip keys past 24 + t1)
    (9, 32, 21, 4),     # both
])
def test_dense_blocks_match_float64_reference(window, offset, T, bq):
    """The dense path's query blocks (keys outside each block's causal and window bounds skipped) against the
    float64 reference over the whole matrix, values and gradients."""
    S = 53
    seg = packed(2, S)
    q, k, v, w = make_inputs(2, S, S, 4, 2, 8, seed=3)
    q, w, qseg = q[:, offset:offset + T], w[:, offset:offset + T], seg[:, offset:offset + T]
    with jax.enable_x64(True):
        ref = lambda q, k, v: reference_attention(q, k, v, qseg, seg, q_offset=offset, sliding_window=window)  # noqa: E731
        dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, qseg, seg, q_offset=offset, sliding_window=window,
                                                        block_q=bq))
        want, want_g = ref(q, k, v), grads(ref, q, k, v, w)
        got, got_g = dense(q, k, v), grads(dense, q, k, v, w)
    assert max_rel(got, want) < 1e-12
    for a, b in zip(got_g, want_g):
        assert max_rel(a, b) < 1e-12


def test_blocked_fp32_and_bf16_against_float64():
    seg = packed(2, 64)
    q, k, v, w = make_inputs(2, 64, 64, 4, 1, 16, seed=1)
    with jax.enable_x64(True):
        want = np.asarray(reference_attention(q, k, v, seg, seg))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        a = [jnp.asarray(x, dtype) for x in (q, k, v)]
        got = blocked_attention(*a, seg, seg, block_q=16, block_k=16)
        dense = reference_attention(*a, seg, seg)
        assert got.dtype == dtype
        got = np.asarray(got.astype(jnp.float32))
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < tol
        assert max_rel(got, dense.astype(jnp.float32)) < tol


def test_blocked_attention_memory_is_linear_in_length():
    """The compiled blocked forward+backward at T = 4096 needs far less than one [H, T, T] fp32 score matrix."""
    T, H = 4096, 2
    x = jax.ShapeDtypeStruct((1, T, H, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s, s)), argnums=(0, 1, 2)))

    blocked = loss(lambda *a: blocked_attention(*a, block_q=256, block_k=256)).lower(x, x, x, seg).compile()
    dense = loss(reference_attention).lower(x, x, x, seg).compile()
    scores = H * T * T * 4
    assert blocked.memory_analysis().temp_size_in_bytes < scores / 8
    assert dense.memory_analysis().temp_size_in_bytes > scores  # the oracle: the dense path does form it


def test_splash_interpret_matches_reference():
    """The splash kernel (interpret mode) with segment ids, GQA (4 query heads on 2 kv heads) and a sliding window,
    through the dispatcher, values and gradients against the dense reference in fp32."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    T, K = 256, 128
    seg = np.ones((1, T), np.int32)
    seg[0, 100:] = 2
    q, k, v, w = (jnp.asarray(x, jnp.float32) for x in make_inputs(1, T, T, 4, 2, K, seed=2))
    for window in (0, 40):
        ref = lambda q, k, v: reference_attention(q, k, v, seg, seg, sliding_window=window)  # noqa: E731, B023
        spl = lambda q, k, v: flash_attention(q, k, v, seg, seg, sliding_window=window, impl="splash")  # noqa: E731, B023
        assert max_rel(spl(q, k, v), ref(q, k, v)) < 1e-5
        for a, b in zip(grads(spl, q, k, v, w), grads(ref, q, k, v, w)):
            assert max_rel(a, b) < 1e-5


def test_resolve_impl():
    assert resolve_impl("auto", 128, 128, 64) == "xla_dense"
    assert resolve_impl("auto", 4096, 4096, 64) == "xla_blocked"
    assert resolve_impl("splash", 1, 1, 1) == "splash"
    with pytest.raises(ValueError, match="attention impl 'flash' is not one of"):
        resolve_impl("flash", 1, 1, 1)
