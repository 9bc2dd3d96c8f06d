"""Grouped matmul in plain XLA for CPU and GPU: a loop over (row tile, group) work items, never densified over G.

Each step takes `items_per_step` work items (metadata.py), gathers their `tm`-row lhs tiles and their groups'
weights, does one batched matmul and scatter-adds the rows that belong to each item's group into the output.
The loop runs only `ceil(num_items / items_per_step)` steps (a while loop with a traced trip count), so the cost
is about `(M / tm + G_local) * tm * K * N` multiply-adds: flat in G while groups are larger than `tm` rows, and
`tm` is chosen from M / G so that small groups do not waste a full tile each.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.metadata import make_work_items


def default_tm(m: int, num_groups: int) -> int:
    """Row tile: a quarter of the mean group size, as a power of two in [8, 128] (fastest on CPU, see README)."""
    quarter = max(m // max(4 * num_groups, 1), 1)
    return int(min(max(1 << (quarter.bit_length() - 1), 8), 128))


def _pad_rows(x, rows):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _item_slots(items, step, items_per_step):
    idx = step * items_per_step + jnp.arange(items_per_step, dtype=jnp.int32)
    live = idx < items.num_items
    idx = jnp.minimum(idx, items.tile.shape[0] - 1)
    return idx, live


def _row_mask(items, idx, live, tm):
    """[B, tm, 1] bool: which rows of each item's tile belong to the item's group."""
    rows = items.tile[idx][:, None] * tm + jnp.arange(tm, dtype=jnp.int32)[None, :]
    mask = (rows >= items.row_lo[idx][:, None]) & (rows < items.row_hi[idx][:, None]) & live[:, None]
    return mask[..., None]


def gmm_xla(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, tm, items_per_step=4):
    """lhs [M, K], rhs [G_local, K, N] (or [G_local, N, K]) -> [M, N] out_dtype; see api.gmm."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    items = make_work_items(group_sizes, m=m, tm=tm, group_offset=group_offset, num_local_groups=rhs.shape[0])
    tiles_m = -(-m // tm)
    lhs_tiles = _pad_rows(lhs, tiles_m * tm).reshape(tiles_m, tm, k)
    contract = "bmk,bnk->bmn" if transpose_rhs else "bmk,bkn->bmn"

    def step(s, out):
        idx, live = _item_slots(items, s, items_per_step)
        tiles = items.tile[idx]
        y = jnp.einsum(contract, lhs_tiles[tiles], rhs[items.group[idx]], preferred_element_type=acc_dtype)
        # Masks of different items are disjoint, so adding zeros elsewhere leaves other groups' rows exact.
        return out.at[tiles].add(jnp.where(_row_mask(items, idx, live, tm), y, 0))

    num_steps = (items.num_items + items_per_step - 1) // items_per_step
    out = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((tiles_m, tm, n), acc_dtype))
    return out.reshape(tiles_m * tm, n)[:m].astype(out_dtype)


def tgmm_xla(lhs, grad, group_sizes, group_offset, *, num_groups, out_dtype, tm):
    """lhs [M, K], grad [M, N] -> [num_groups, K, N] out_dtype: per-group lhs^T @ grad; see api.tgmm."""
    m, k = lhs.shape
    n = grad.shape[1]
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    items = make_work_items(group_sizes, m=m, tm=tm, group_offset=group_offset, num_local_groups=num_groups)
    tiles_m = -(-m // tm)
    lhs_tiles = _pad_rows(lhs, tiles_m * tm).reshape(tiles_m, tm, k)
    grad_tiles = _pad_rows(grad, tiles_m * tm).reshape(tiles_m, tm, n)

    def step(s, out):
        idx, live = _item_slots(items, s, 1)
        tile, group = items.tile[idx[0]], items.group[idx[0]]
        mask = _row_mask(items, idx, live, tm)[0]
        x = jnp.where(mask, lhs_tiles[tile], 0)
        dy = jnp.where(mask, grad_tiles[tile], 0)
        # One item per step, updated in place: scatter-adding [K, N] blocks was 1.4x slower (fwd+bwd, G=512).
        acc = jax.lax.dynamic_index_in_dim(out, group, keepdims=False)
        acc = acc + jnp.matmul(x.T, dy, preferred_element_type=acc_dtype)
        return jax.lax.dynamic_update_index_in_dim(out, acc, group, 0)

    out = jax.lax.fori_loop(0, items.num_items, step, jnp.zeros((num_groups, k, n), acc_dtype))
    return out.astype(out_dtype)
