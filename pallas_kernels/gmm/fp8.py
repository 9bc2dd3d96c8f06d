"""FP8 grouped matmul for quantized training: qwix's quantized ragged-dot recipe on this package's kernels.

`gmm_fp8(lhs [M, K], rhs [G, K, N], group_sizes)` quantizes both operands with qwix (`qwix.pallas.quantize`,
absmax current scaling) to `fwd_dtype` (e4m3), runs `gmm` on the FP8 values (any impl: the kernels accept FP8
inputs and accumulate in f32) and applies the scales to the output. The backward quantizes the incoming gradient
to `bwd_dtype` (e5m2) and runs `gmm` / `tgmm` on FP8 values again. Every scale sits on a non-contracting axis,
so each product is an exact FP8 x FP8 matmul followed by a rescale (what an FP8 MXU computes):

- forward: lhs per row [M, 1], rhs per (group, column) [G, 1, N];
- d_lhs = (g * rhs_scale[group of row]) quantized per row, times rhs^T (contracting N);
- d_rhs = lhs^T times (g * lhs_scale) quantized per column [1, N] (contracting M).

The residuals kept for the backward are the FP8 values and their f32 scales (1 byte an element instead of 2).
qwix's own `ragged_dot_qt` uses the same backward but one weight scale per column shared by all experts, and runs
on `jax.lax.ragged_dot` (dense [G, M, K] masking off TPU). The errors are the same while the experts' weight
magnitudes stay inside e4m3's range (10^+-1.5: 3.7e-2 both); per-expert scales matter only past it (10^+-4,
benchmarks/fp8_error.py). This path is kept for running on the package's kernels (flat in G on CPU/GPU, Pallas on
TPU, expert-parallel shards). `channelwise=False` gives one scale per tensor instead.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.api import gmm, tgmm

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def quantize(x, qtype, channelwise_axes):
    """(fp8 values, f32 scale broadcastable to x): qwix absmax quantization, `x ~ values * scale`."""
    import qwix.pallas as qpl

    q = qpl.quantize(x.astype(jnp.float32), qtype, channelwise_axes=tuple(channelwise_axes),
                     calibration_method="absmax")
    return q.qvalue, q.scale


def _row_scale(scale_G1N, group_sizes, m, group_offset):
    """[M, N or 1]: each row's group's scale (rows outside the local groups borrow an edge group's: they are 0)."""
    if scale_G1N.shape[0] == 1:
        return scale_G1N[0]
    ends = jnp.cumsum(jnp.maximum(group_sizes, 0))
    group_of_row = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
    local = jnp.clip(group_of_row - group_offset, 0, scale_G1N.shape[0] - 1)
    return scale_G1N[local, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_fp8(lhs, rhs, group_sizes, group_offset, st):
    return _fwd(lhs, rhs, group_sizes, group_offset, st)[0]


def _fwd(lhs, rhs, group_sizes, group_offset, st):
    fwd_dtype, _, channelwise, impl, out_dtype, _, _ = st
    q_lhs, s_lhs = quantize(lhs, fwd_dtype, (0,) if channelwise else ())
    q_rhs, s_rhs = quantize(rhs, fwd_dtype, (0, 2) if channelwise else ())
    y = gmm(q_lhs, q_rhs, group_sizes, group_offset=group_offset, impl=impl, preferred_element_type=jnp.float32)
    y = y * s_lhs * _row_scale(s_rhs, group_sizes, lhs.shape[0], group_offset)
    return y.astype(out_dtype), (q_lhs, s_lhs, q_rhs, s_rhs, group_sizes, group_offset)


def _bwd(st, res, g_MN):
    _, bwd_dtype, channelwise, impl, _, lhs_dtype, rhs_dtype = st
    q_lhs, s_lhs, q_rhs, s_rhs, group_sizes, group_offset = res
    g = g_MN.astype(jnp.float32)
    g_dlhs, s_dlhs = quantize(g * _row_scale(s_rhs, group_sizes, g.shape[0], group_offset), bwd_dtype,
                              (0,) if channelwise else ())
    d_lhs = gmm(g_dlhs, q_rhs, group_sizes, transpose_rhs=True, group_offset=group_offset, impl=impl,
                preferred_element_type=jnp.float32) * s_dlhs
    g_drhs, s_drhs = quantize(g * s_lhs, bwd_dtype, (1,) if channelwise else ())
    d_rhs = tgmm(q_lhs, g_drhs, group_sizes, num_groups=q_rhs.shape[0], group_offset=group_offset, impl=impl,
                 preferred_element_type=jnp.float32) * s_drhs[None]
    return d_lhs.astype(lhs_dtype), d_rhs.astype(rhs_dtype), None, None


_gmm_fp8.defvjp(_fwd, _bwd)


def gmm_fp8(lhs, rhs, group_sizes, *, fwd_dtype=E4M3, bwd_dtype=E5M2, channelwise=True, group_offset=None,
            preferred_element_type=None, impl="auto"):
    """FP8 `gmm`: lhs [M, K], rhs [G_local, K, N] float, group_sizes [G] int -> [M, N] (see the module doc).

    Differentiable in lhs and rhs; fwd_dtype / bwd_dtype are the FP8 types of the forward operands and of the
    gradients; channelwise=False uses one scale per tensor. Returns preferred_element_type (default: the
    promoted input dtype). rhs in [G, N, K] layout (transpose_rhs) is not supported here.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm_fp8: expected lhs [M, K] and rhs [G, K, N], got lhs{lhs.shape} rhs{rhs.shape}")
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    st = (jnp.dtype(fwd_dtype), jnp.dtype(bwd_dtype), bool(channelwise), impl, out_dtype, jnp.dtype(lhs.dtype),
          jnp.dtype(rhs.dtype))
    return _gmm_fp8(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), offset, st)
