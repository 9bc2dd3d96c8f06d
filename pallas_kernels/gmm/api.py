"""Public grouped matmul: `gmm` (differentiable, weight gradient by `tgmm`) and `tgmm`, dispatching to an impl.

impl: "reference" (per-group masked matmul), "xla" (work-item loop, CPU/GPU), "pallas" (Mosaic TPU kernel;
interpret mode off TPU), "auto" (pallas on a TPU backend, xla elsewhere).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import target

from pallas_kernels.gmm import pallas_tpu, reference, xla

IMPLS = ("reference", "xla", "pallas", "auto")
_BLOCK_BYTES = 8 * 1024 * 1024  # one weight block; double-buffered it stays well inside the VMEM limit


class _Static(NamedTuple):
    impl: str
    tiling: tuple | None  # (tm, tk, tn) in the forward's K and N; None for defaults
    interpret: object


def _largest_divisor(dim, candidates):
    return next((c for c in candidates if dim % c == 0), dim)


def _default_tm(m):
    return m if m <= 128 else 128


def _gmm_tiling(m, k, n, itemsize):
    tn = _largest_divisor(n, (512, 256, 128))
    fitting = [c for c in (k, 2048, 1024, 512, 256, 128) if c * tn * itemsize <= _BLOCK_BYTES]
    tk = _largest_divisor(k, fitting) if fitting else k
    return _default_tm(m), tk, tn


def _tgmm_tiling(m, k, n):
    return _default_tm(m), _largest_divisor(k, (512, 256, 128)), _largest_divisor(n, (1024, 512, 256, 128))


def _check_tiling(tiling, k, n, what):
    tm, tk, tn = tiling
    if tm <= 0 or k % tk or n % tn:
        raise ValueError(f"{what}: tiling (tm, tk, tn)={tiling} must have tm > 0, tk dividing K={k}, tn dividing N={n}")


def resolve_impl(impl: str) -> str:
    """The implementation `impl` names here: "auto" is "pallas" on TPU (or under `compile_for("tpu")`), else "xla"."""
    return _resolve(impl, None)[0]


def _resolve(impl, interpret):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_tpu = target.on_tpu()
    if impl == "auto":
        impl = "pallas" if on_tpu else "xla"
    return impl, (not on_tpu) if interpret is None else interpret


def _run_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, st, tiling):
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if st.impl == "reference":
        return reference.gmm_reference(
            lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, preferred_element_type=out_dtype,
            group_offset=group_offset,
        )
    if st.impl == "xla":
        tm = tiling[0] if tiling else xla.default_tm(m, rhs.shape[0])
        return xla.gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype, tm=tm)
    tiling = tiling or _gmm_tiling(m, k, n, rhs.dtype.itemsize)
    _check_tiling(tiling, k, n, "gmm")
    return pallas_tpu.gmm_pallas(
        lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype, tiling=tiling,
        interpret=st.interpret,
    )


def _run_tgmm(lhs, grad, group_sizes, group_offset, num_groups, out_dtype, st, tiling):
    m, k = lhs.shape
    n = grad.shape[1]
    if st.impl == "reference":
        return reference.tgmm_reference(
            lhs, grad, group_sizes, num_groups=num_groups, preferred_element_type=out_dtype, group_offset=group_offset
        )
    if st.impl == "xla":
        tm = tiling[0] if tiling else xla.default_tm(m, num_groups)
        return xla.tgmm_xla(lhs, grad, group_sizes, group_offset, num_groups=num_groups, out_dtype=out_dtype, tm=tm)
    tiling = tiling or _tgmm_tiling(m, k, n)
    _check_tiling(tiling, k, n, "tgmm")
    return pallas_tpu.tgmm_pallas(
        lhs, grad, group_sizes, group_offset, num_groups=num_groups, out_dtype=out_dtype, tiling=tiling,
        interpret=st.interpret,
    )


def _swap_kn(tiling):
    return None if tiling is None else (tiling[0], tiling[2], tiling[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, st):
    return _run_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, st, st.tiling)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, st):
    out = _run_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, st, st.tiling)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(transpose_rhs, out_dtype, st, res, d_out):
    lhs, rhs, group_sizes, group_offset = res
    # d_lhs rows of groups outside the shard come out zero, as the forward's rows did.
    d_lhs = _run_gmm(d_out, rhs, group_sizes, group_offset, not transpose_rhs, lhs.dtype, st, _swap_kn(st.tiling))
    g_local = rhs.shape[0]
    if transpose_rhs:  # rhs is [G, N, K]: its gradient is d_out^T lhs per group, no transpose needed
        d_rhs = _run_tgmm(d_out, lhs, group_sizes, group_offset, g_local, rhs.dtype, st, _swap_kn(st.tiling))
    else:
        d_rhs = _run_tgmm(lhs, d_out, group_sizes, group_offset, g_local, rhs.dtype, st, st.tiling)
    return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check_float(x, name):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def _check_groups(group_sizes, num_local_groups, group_offset, what):
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{what}: group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")
    if group_offset is None and num_local_groups != group_sizes.shape[0]:
        raise ValueError(
            f"{what}: {num_local_groups} local groups but group_sizes has {group_sizes.shape[0]}; "
            "pass group_offset when the weights are a shard of the groups"
        )
    if num_local_groups > group_sizes.shape[0]:
        raise ValueError(f"{what}: {num_local_groups} local groups exceed group_sizes' {group_sizes.shape[0]}")
    offset = jnp.asarray(0 if group_offset is None else group_offset)
    if offset.ndim != 0 or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(f"{what}: group_offset must be an integer scalar, got {offset.dtype}{offset.shape}")
    return group_sizes.astype(jnp.int32), offset.astype(jnp.int32)


def _check_tiling_arg(tiling):
    if tiling is not None and (len(tiling) != 3 or not all(isinstance(t, int) for t in tiling)):
        raise ValueError(f"tiling must be None or a tuple of 3 ints (tm, tk, tn), got {tiling!r}")
    return None if tiling is None else tuple(tiling)


def gmm(
    lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None, tiling=None, group_offset=None,
    impl="auto", interpret=None,
):
    """Grouped matmul: `out[i] = lhs[i] @ rhs[g(i) - group_offset]`, rows of lhs sorted by group.

    lhs: [M, K] float. rhs: [G_local, K, N] ([G_local, N, K] if transpose_rhs) float.
    group_sizes: [G] int, rows per group (G = G_local unless group_offset is given); rows past sum(group_sizes)
      and rows of groups outside [group_offset, group_offset + G_local) produce zeros.
    group_offset: int scalar (may be traced), first global group held by rhs (expert parallelism).
    preferred_element_type: output dtype (default: promoted input dtype); accumulation is always f32 or wider.
    tiling: (tm, tk, tn) row/K/N tiles; the xla impl uses only tm. The backward uses the same tiles per dim.
    Differentiable in lhs and rhs (custom VJP: d_lhs by gmm against the transposed weights, d_rhs by tgmm).
    Returns [M, N].
    """
    _check_float(lhs, "lhs")
    _check_float(rhs, "rhs")
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm: expected lhs [M, K] and rhs [G, K, N], got lhs{lhs.shape} rhs{rhs.shape}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        layout = "[G, N, K]" if transpose_rhs else "[G, K, N]"
        raise ValueError(f"gmm: lhs{lhs.shape} K={lhs.shape[1]} does not match rhs{rhs.shape} ({layout}) K={k_rhs}")
    group_sizes, offset = _check_groups(group_sizes, rhs.shape[0], group_offset, "gmm")
    impl, interpret = _resolve(impl, interpret)
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    st = _Static(impl, _check_tiling_arg(tiling), interpret)
    return _jit_gmm(lhs, rhs, group_sizes, offset, bool(transpose_rhs), out_dtype, st)


def tgmm(
    lhs, grad, group_sizes, *, num_groups=None, preferred_element_type=None, tiling=None, group_offset=None,
    impl="auto", interpret=None,
):
    """Per-group `lhs_g^T @ grad_g` (the weight gradient of gmm), rows sorted by group.

    lhs: [M, K] float; grad: [M, N] float; group_sizes: [G] int.
    num_groups: static number of output groups G_local (default G), starting at group_offset.
    Returns [G_local, K, N] in preferred_element_type (default: promoted input dtype); empty groups give zeros.
    """
    _check_float(lhs, "lhs")
    _check_float(grad, "grad")
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: expected lhs [M, K] and grad [M, N] with equal M, got lhs{lhs.shape} grad{grad.shape}")
    num_groups = group_sizes.shape[0] if num_groups is None else int(num_groups)
    group_sizes, offset = _check_groups(group_sizes, num_groups, group_offset, "tgmm")
    impl, interpret = _resolve(impl, interpret)
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, grad.dtype))
    st = _Static(impl, _check_tiling_arg(tiling), interpret)
    return _jit_tgmm(lhs, grad, group_sizes, offset, num_groups, out_dtype, st)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _jit_gmm(lhs, rhs, group_sizes, offset, transpose_rhs, out_dtype, st):
    return _gmm(lhs, rhs, group_sizes, offset, transpose_rhs, out_dtype, st)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _jit_tgmm(lhs, grad, group_sizes, offset, num_groups, out_dtype, st):
    return _run_tgmm(lhs, grad, group_sizes, offset, num_groups, out_dtype, st, st.tiling)
