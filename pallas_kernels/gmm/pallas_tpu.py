"""Pallas TPU (Mosaic) grouped matmul kernels; run on CPU with interpret=True.

Both kernels walk the work items of metadata.py (one per (row tile, group) pair), which are scalar-prefetched
into SMEM and drive the BlockSpec index maps; the item axis of the grid has the data-dependent length
`num_items` (a traced grid bound), so no step is spent on padding.

gmm, grid (N tiles, items, K tiles): item w multiplies lhs tile `tile[w]` by weight block `group[w]` into an f32
VMEM accumulator; on the last K step it writes the rows of its group into the output tile, keeping the rows
written by earlier items of the same tile (visits of a tile are consecutive, so the tile stays in VMEM) and
zeroing rows on the tile's first visit. When K fits in one block (the default when VMEM allows), consecutive items
of one group reuse the resident weight block, so each expert's weights are read from HBM about once per N tile.

tgmm, grid (K tiles, N tiles, items): item w adds `lhs_tile^T @ grad_tile` (rows masked to its group) into the
accumulator of its group's [tk, tn] block, which is zeroed on the group's first item and stored on its last.
Empty groups get one item that stores zeros.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.metadata import make_work_items

_VMEM_CAP = 48 * 1024 * 1024  # below v7x's 64 MiB per core


def _compute_dtype(a, b):
    # Feed the MXU bf16 only when both operands are bf16; anything else is computed from f32.
    return jnp.bfloat16 if a == b == jnp.bfloat16 else jnp.float32


def _vmem_limit(*block_bytes):
    need = sum(block_bytes)
    return int(min(max(2 * need, 16 * 1024 * 1024), _VMEM_CAP))


def _rows_in_item(tile, lo, hi, tm, width):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (rows >= lo) & (rows < hi)


def gmm_pallas(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, tiling, interpret):
    """lhs [M, K], rhs [G_local, K, N] ([G_local, N, K] if transpose_rhs) -> [M, N] out_dtype.

    tiling: (tm, tk, tn) with tk dividing K and tn dividing N (checked by the caller).
    """
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    tiles_k, tiles_n = k // tk, n // tn
    cdt = _compute_dtype(lhs.dtype, rhs.dtype)
    items = make_work_items(
        group_sizes, m=m, tm=tm, group_offset=group_offset, num_local_groups=rhs.shape[0], cover_all_tiles=True
    )

    def kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        del group_ref
        w, ki = pl.program_id(1), pl.program_id(2)
        lo, hi = lo_ref[w], hi_ref[w]

        @pl.when(ki == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(hi > lo)
        def _accumulate():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...].astype(cdt), rhs_ref[...].astype(cdt), dims, preferred_element_type=jnp.float32
            )

        @pl.when(ki == tiles_k - 1)
        def _store():
            tile = tile_ref[w]
            first_visit = (w == 0) | (tile_ref[jnp.maximum(w - 1, 0)] != tile)
            # On a first visit the output buffer holds stale VMEM: select zeros, never arithmetic on it.
            kept = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
            mine = _rows_in_item(tile, lo, hi, tm, tn)
            out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)

    def k_index(w, ki, lo_ref, hi_ref):
        # Null items stay on the last K block so that they trigger no new weight DMA.
        return jnp.where(hi_ref[w] > lo_ref[w], ki, tiles_k - 1)

    def lhs_map(ni, w, ki, tile_ref, group_ref, lo_ref, hi_ref):
        return tile_ref[w], k_index(w, ki, lo_ref, hi_ref)

    def rhs_map(ni, w, ki, tile_ref, group_ref, lo_ref, hi_ref):
        kk = k_index(w, ki, lo_ref, hi_ref)
        return (group_ref[w], ni, kk) if transpose_rhs else (group_ref[w], kk, ni)

    def out_map(ni, w, ki, tile_ref, group_ref, lo_ref, hi_ref):
        return tile_ref[w], ni

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_bytes = 2 * (tm * tk * lhs.dtype.itemsize + tk * tn * rhs.dtype.itemsize)
    out_bytes = 2 * tm * tn * jnp.dtype(out_dtype).itemsize + 4 * tm * tn
    # Typical, not worst-case, traffic: with one K block each group's weights are fetched once per N tile.
    weight_reads = rhs.shape[0] if tiles_k == 1 else items.tile.shape[0]
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=tiles_n * lhs.nbytes + weight_reads * k * n * rhs.dtype.itemsize
        + m * n * jnp.dtype(out_dtype).itemsize,
        transcendentals=0,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, items.num_items, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(in_bytes, out_bytes),
        ),
        cost_estimate=cost,
        interpret=interpret,
    )
    return call(items.tile, items.group, items.row_lo, items.row_hi, lhs, rhs)


def tgmm_pallas(lhs, grad, group_sizes, group_offset, *, num_groups, out_dtype, tiling, interpret):
    """lhs [M, K], grad [M, N] -> [num_groups, K, N] out_dtype, out[g] = lhs_g^T @ grad_g.

    tiling: (tm, tk, tn) with tk dividing K and tn dividing N (checked by the caller).
    """
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = tiling
    tiles_k, tiles_n = k // tk, n // tn
    cdt = _compute_dtype(lhs.dtype, grad.dtype)
    items = make_work_items(
        group_sizes, m=m, tm=tm, group_offset=group_offset, num_local_groups=num_groups, visit_empty_groups=True
    )

    def kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, grad_ref, out_ref, acc_ref):
        w, last = pl.program_id(2), pl.num_programs(2) - 1
        group = group_ref[w]
        lo, hi = lo_ref[w], hi_ref[w]

        @pl.when((w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != group))
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(hi > lo)
        def _accumulate():
            tile = tile_ref[w]
            # Mask both operands with a select: rows of other groups (or past M) may hold anything, NaN included.
            x = jnp.where(_rows_in_item(tile, lo, hi, tm, tk), lhs_ref[...].astype(jnp.float32), 0.0)
            dy = jnp.where(_rows_in_item(tile, lo, hi, tm, tn), grad_ref[...].astype(jnp.float32), 0.0)
            acc_ref[...] += jax.lax.dot_general(
                x.astype(cdt), dy.astype(cdt), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )

        @pl.when((w == last) | (group_ref[jnp.minimum(w + 1, last)] != group))
        def _store():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(ki, ni, w, tile_ref, group_ref, lo_ref, hi_ref):
        return tile_ref[w], ki

    def grad_map(ki, ni, w, tile_ref, group_ref, lo_ref, hi_ref):
        return tile_ref[w], ni

    def out_map(ki, ni, w, tile_ref, group_ref, lo_ref, hi_ref):
        return group_ref[w], ki, ni

    in_bytes = 2 * tm * (tk * lhs.dtype.itemsize + tn * grad.dtype.itemsize)
    out_bytes = 2 * tk * tn * jnp.dtype(out_dtype).itemsize + 4 * tk * tn
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        bytes_accessed=tiles_n * lhs.nbytes + tiles_k * grad.nbytes
        + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
        transcendentals=0,
    )
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_k, tiles_n, items.num_items),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(in_bytes, out_bytes),
        ),
        cost_estimate=cost,
        interpret=interpret,
    )
    return call(items.tile, items.group, items.row_lo, items.row_hi, lhs, grad)

