"""gmm / tgmm: every impl against a float64 numpy oracle (values and gradients), edge cases, TPU AOT compile."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import gmm, gmm_reference, tgmm
from pallas_kernels.gmm.metadata import make_work_items

IMPLS = ["reference", "xla", "pallas"]
# Pallas in interpret mode at toy sizes; tk < K and tn < N so the K loop and N grid axis are exercised.
TILING = {"reference": None, "xla": (8, 128, 128), "pallas": (16, 64, 128)}


def _group_ids(group_sizes, m, offset, g_local):
    """Local group of each row, -1 for rows outside the shard or past sum(group_sizes)."""
    gid = np.repeat(np.arange(len(group_sizes)), group_sizes)[:m] - offset
    gid = np.concatenate([gid, np.full(m - len(gid), -1)])
    return np.where((gid >= 0) & (gid < g_local), gid, -1)


def _oracle(x, w, group_sizes, d_out, *, transpose_rhs=False, offset=0):
    """float64 out, d_lhs, d_rhs of sum(gmm(x, w) * d_out)."""
    x, w, d_out = (np.asarray(a, np.float64) for a in (x, w, d_out))
    w_kn = np.swapaxes(w, 1, 2) if transpose_rhs else w
    gid = _group_ids(np.asarray(group_sizes), x.shape[0], offset, w.shape[0])
    out = np.zeros((x.shape[0], w_kn.shape[2]))
    d_x = np.zeros_like(x)
    d_w = np.zeros_like(w_kn)
    for g in range(w.shape[0]):
        rows = gid == g
        out[rows] = x[rows] @ w_kn[g]
        d_x[rows] = d_out[rows] @ w_kn[g].T
        d_w[g] = x[rows].T @ d_out[rows]
    return out, d_x, (np.swapaxes(d_w, 1, 2) if transpose_rhs else d_w)


def _inputs(m, k, n, group_sizes, dtype=jnp.float32, seed=0, g_local=None):
    rng = np.random.default_rng(seed)
    g_local = len(group_sizes) if g_local is None else g_local
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g_local, k, n)) / np.sqrt(k), dtype)
    d_out = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return x, w, jnp.asarray(group_sizes, jnp.int32), d_out


def _tiling(impl):
    return TILING[impl]


def _value_and_grads(impl, x, w, gs, d_out, **kw):
    def loss(x, w):
        out = gmm(x, w, gs, impl=impl, tiling=_tiling(impl), **kw)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), (d_x, d_w) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return out, d_x, d_w


def _assert_close(got, want, tol):
    got = np.asarray(got, np.float64)
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)


# Ragged, not tile multiples, empty groups at both ends and inside, and sum(group_sizes) < M (last 9 rows idle).
SIZES = [0, 13, 0, 40, 1, 17, 0, 20, 0]
M, K, N = 100, 128, 256


@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_grads(impl):
    x, w, gs, d_out = _inputs(M, K, N, SIZES)
    out, d_x, d_w = _value_and_grads(impl, x, w, gs, d_out)
    want = _oracle(x, w, SIZES, d_out)
    for got, ref in zip((out, d_x, d_w), want):
        _assert_close(got, ref, 1e-5)
    assert not np.asarray(out[91:]).any() and not np.asarray(d_x[91:]).any()  # rows past the groups


@pytest.mark.parametrize("impl", IMPLS)
def test_transpose_rhs(impl):
    x, w, gs, d_out = _inputs(M, K, N, SIZES, seed=1)
    w_t = jnp.swapaxes(w, 1, 2)  # [G, N, K]
    out, d_x, d_w = _value_and_grads(impl, x, w_t, gs, d_out, transpose_rhs=True)
    assert d_w.shape == w_t.shape
    for got, ref in zip((out, d_x, d_w), _oracle(x, w_t, SIZES, d_out, transpose_rhs=True)):
        _assert_close(got, ref, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_offset(impl):
    # Weights of groups 3..6 only (an expert-parallel shard); the offset is traced, as under shard_map.
    x, w, gs, d_out = _inputs(M, K, N, SIZES, seed=2, g_local=4)
    out, d_x, d_w = _value_and_grads(impl, x, w, gs, d_out, group_offset=jnp.int32(3))
    for got, ref in zip((out, d_x, d_w), _oracle(x, w, SIZES, d_out, offset=3)):
        _assert_close(got, ref, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_f32_accumulation(impl):
    sizes = [30, 0, 70, 28]
    x, w, gs, d_out = _inputs(128, K, N, sizes, dtype=jnp.bfloat16, seed=3)
    out, d_x, d_w = _value_and_grads(impl, x, w, gs, d_out, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and d_x.dtype == jnp.bfloat16 and d_w.dtype == jnp.bfloat16
    want = _oracle(x, w, sizes, d_out)
    _assert_close(out, want[0], 1e-5)  # exact products of bf16 inputs, f32 sums
    _assert_close(d_x, want[1], 1e-2)  # bf16 outputs
    _assert_close(d_w, want[2], 1e-2)
    assert jax.eval_shape(lambda: gmm(x, w, gs, impl=impl, tiling=_tiling(impl))).dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_empty_groups_and_offset(impl):
    x, _, gs, d_out = _inputs(M, K, N, SIZES, seed=4)
    got = tgmm(x, d_out, gs, impl=impl, tiling=_tiling(impl))
    _, _, want = _oracle(x, np.zeros((len(SIZES), K, N)), SIZES, d_out)
    _assert_close(got, want, 1e-5)
    assert not np.asarray(got[0]).any() and not np.asarray(got[8]).any()
    got = tgmm(x, d_out, gs, num_groups=3, group_offset=5, impl=impl, tiling=_tiling(impl))
    _assert_close(got, want[5:8], 1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_512_groups(impl):
    # Qwen3.5's expert count with mostly tiny and empty groups, against a per-row oracle.
    rng = np.random.default_rng(5)
    sizes = rng.multinomial(700, rng.dirichlet(np.full(512, 0.3)))
    x, w, gs, d_out = _inputs(720, 16, 128, sizes, seed=5)
    tiling = (16, 16, 128) if impl == "pallas" else None
    out = gmm(x, w, gs, impl=impl, tiling=tiling)
    gid = _group_ids(sizes, 720, 0, 512)
    want = np.where((gid >= 0)[:, None], np.einsum("mk,mkn->mn", np.asarray(x), np.asarray(w)[gid]), 0)
    _assert_close(out, want, 1e-5)
    d_w = tgmm(x, d_out, gs, impl=impl, tiling=tiling)
    want_dw = np.zeros((512, 16, 128))
    np.add.at(want_dw, gid[gid >= 0], np.einsum("mk,mn->mkn", np.asarray(x), np.asarray(d_out))[gid >= 0])
    _assert_close(d_w, want_dw, 1e-5)


def test_reference_is_float64():
    with jax.enable_x64(True):
        x, w, gs, d_out = _inputs(M, K, N, SIZES, dtype=jnp.float64, seed=6)
        out = gmm_reference(x, w, gs)
        assert out.dtype == jnp.float64
        _assert_close(out, _oracle(x, w, SIZES, d_out)[0], 1e-13)
        out = gmm(x, w, gs, impl="xla")  # the xla path is dtype-generic too
        _assert_close(out, _oracle(x, w, SIZES, d_out)[0], 1e-13)


def test_work_items_cover_every_tile_once_in_order():
    rng = np.random.default_rng(7)
    g, m = 37, 250
    build = jax.jit(
        lambda sizes, tm: make_work_items(sizes, m=m, tm=tm, group_offset=0, num_local_groups=g, cover_all_tiles=True),
        static_argnums=1,
    )
    for trial in range(30):
        tm = int(rng.choice([8, 16, 32]))
        sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.full(g, rng.choice([0.1, 1.0]))))
        items = build(jnp.asarray(sizes, jnp.int32), tm)
        n = int(items.num_items)
        tiles = np.asarray(items.tile)[:n]
        assert n <= len(items.tile), trial
        assert sorted(set(tiles)) == list(range(-(-m // tm))) and (np.diff(tiles) >= 0).all(), trial
        covered = np.zeros(m, int)
        for lo, hi in zip(np.asarray(items.row_lo)[:n], np.asarray(items.row_hi)[:n]):
            covered[lo:hi] += 1
        assert (covered[: min(sizes.sum(), m)] >= 1).all() and not covered[sizes.sum():].any(), trial


def test_bad_inputs_raise_clear_errors():
    x, w, gs, _ = _inputs(M, K, N, SIZES)
    with pytest.raises(ValueError, match="does not match rhs"):
        gmm(x[:, :64], w, gs)
    with pytest.raises(ValueError, match="lhs \\[M, K\\] and rhs"):
        gmm(x[None], w, gs)
    with pytest.raises(TypeError, match="lhs must be a floating"):
        gmm(x.astype(jnp.int32), w, gs)
    with pytest.raises(ValueError, match="group_sizes must be a 1-D integer"):
        gmm(x, w, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="pass group_offset"):
        gmm(x, w[:3], gs)
    with pytest.raises(ValueError, match="impl must be one of"):
        gmm(x, w, gs, impl="cuda")
    with pytest.raises(ValueError, match="tk dividing K=128"):
        gmm(x, w, gs, impl="pallas", tiling=(16, 96, 128))
    with pytest.raises(ValueError, match="equal M"):
        tgmm(x, x[:50], gs)


def test_aot_compile_for_tpu_at_qwen35_397b_expert_shape():
    """Real Mosaic + XLA:TPU compile (no TPU needed) of the forward and the backward at G=512, H=4096, I=1024."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed to compile for TPU on a CPU host")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    one = jax.sharding.SingleDeviceSharding(topo.devices[0])
    rows, hidden, inter, experts = 8192, 4096, 1024, 512  # 8192 routed rows (tokens x top-k)
    x = jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16, sharding=one)
    w = jax.ShapeDtypeStruct((experts, hidden, inter), jnp.bfloat16, sharding=one)
    gs = jax.ShapeDtypeStruct((experts,), jnp.int32, sharding=one)

    def fwd(x, w, gs):
        return gmm(x, w, gs, impl="pallas", interpret=False)

    def bwd(x, w, gs):  # d_lhs (gmm with transposed weights) and d_rhs (tgmm): both backward kernels
        return jax.grad(lambda x, w: jnp.sum(fwd(x, w, gs).astype(jnp.float32)), argnums=(0, 1))(x, w)

    compiled = jax.jit(fwd).lower(x, w, gs).compile()
    assert compiled.memory_analysis().output_size_in_bytes >= rows * inter * 2
    compiled = jax.jit(bwd).lower(x, w, gs).compile()
    assert compiled.memory_analysis().output_size_in_bytes >= (rows * hidden + experts * hidden * inter) * 2
