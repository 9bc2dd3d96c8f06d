"""Work-item metadata for grouped matmul: which (row tile, group) pairs to compute, in which order.

Rows of `lhs` are sorted by group, so group g owns rows `[start_g, end_g)`. Rows are cut into `tiles_m` tiles of
`tm` rows. A work item is one (tile, group) pair whose row ranges intersect: a tile that straddles a group
boundary is visited once per group it touches. Items are ordered by group, which (groups being contiguous and
sorted) is also ascending tile order, so every output tile's visits are consecutive (the TPU kernel keeps the tile
resident across them) and every group's items are consecutive (tgmm keeps its weight-gradient block resident).

The number of items is data dependent but bounded by the static `tiles_m + num_local_groups`: each group adds at
most one extra visit (the tile its first row lands in mid-way), and `visit_empty_groups` adds one per empty group.
Entries past `num_items` are padding and must not be computed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class WorkItems(NamedTuple):
    """Per-item metadata, each int32 of static length `tiles_m + num_local_groups` (W).

    tile: row tile index in `[0, tiles_m)`.
    group: local group index in `[0, num_local_groups)` (the weight shard's index), clamped on padding/null items.
    row_lo, row_hi: the item's rows are `[row_lo, row_hi)` intersected with the tile; equal for null items
      (an output tile no local group touches, visited only so that it is written with zeros).
    num_items: int32 scalar, how many leading entries are real.
    """

    tile: jax.Array
    group: jax.Array
    row_lo: jax.Array
    row_hi: jax.Array
    num_items: jax.Array


def make_work_items(
    group_sizes: jax.Array,
    *,
    m: int,
    tm: int,
    group_offset: jax.Array,
    num_local_groups: int,
    cover_all_tiles: bool = False,
    visit_empty_groups: bool = False,
) -> WorkItems:
    """Builds the item list for `m` rows in tiles of `tm`, for local groups `[group_offset, +num_local_groups)`.

    group_sizes: [G] int32, rows per (global) group; negative sizes count as 0 and rows past `m` are dropped.
    group_offset: int32 scalar, first global group whose weights are present.
    cover_all_tiles: add a null item for every tile no local group touches (gmm output must be written).
    visit_empty_groups: give every empty local group one null item (tgmm must write its zero gradient).
    """
    tiles_m = -(-m // tm)
    num_slots = tiles_m + num_local_groups
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends_all = jnp.minimum(jnp.cumsum(sizes), m)
    starts_all = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_all[:-1]])
    offset = jnp.asarray(group_offset, jnp.int32)
    lo = jax.lax.dynamic_slice_in_dim(starts_all, offset, num_local_groups)
    hi = jax.lax.dynamic_slice_in_dim(ends_all, offset, num_local_groups)

    nonempty = hi > lo
    first_tile = jnp.minimum(lo // tm, tiles_m - 1)
    count = jnp.where(nonempty, (hi - 1) // tm - first_tile + 1, 0)
    if visit_empty_groups:
        count = jnp.maximum(count, 1)
    cum = jnp.cumsum(count)
    total = cum[-1]

    if cover_all_tiles:
        # Local groups are contiguous in rows, so the tiles they touch form one run [t_first, t_last].
        any_rows = hi[-1] > lo[0]
        t_first = jnp.where(any_rows, lo[0] // tm, tiles_m)
        t_last = jnp.where(any_rows, (hi[-1] - 1) // tm, tiles_m - 1)
        n_pre = t_first
        n_post = tiles_m - 1 - t_last
    else:
        t_last = jnp.int32(tiles_m - 1)
        n_pre = jnp.int32(0)
        n_post = jnp.int32(0)

    slot = jnp.arange(num_slots, dtype=jnp.int32)
    j = slot - n_pre
    in_groups = (j >= 0) & (j < total)
    g = jnp.clip(jnp.searchsorted(cum, j, side="right"), 0, num_local_groups - 1).astype(jnp.int32)
    tile_in_group = first_tile[g] + j - (cum[g] - count[g])
    tile = jnp.where(j < 0, slot, jnp.where(in_groups, tile_in_group, t_last + 1 + j - total))
    tile = jnp.clip(tile, 0, tiles_m - 1)
    row_lo = jnp.where(in_groups, lo[g], 0)
    row_hi = jnp.where(in_groups, hi[g], 0)
    # Null items borrow the nearest group's weights so the TPU pipeline does not fetch a new weight block.
    group = jnp.where(j < 0, 0, jnp.where(in_groups, g, num_local_groups - 1))
    num_items = (n_pre + total + n_post).astype(jnp.int32)
    return WorkItems(tile, group, row_lo, row_hi, num_items)
