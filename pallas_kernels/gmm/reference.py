"""Obviously-correct grouped matmul: one masked dense matmul per group. Slow (cost linear in G); the oracle.

Works in any float dtype, float64 included (enable x64), and is differentiable by ordinary autodiff.
"""

import jax.numpy as jnp


def _row_masks(group_sizes, m, group_offset, num_local_groups):
    """[G_local, M] bool: row i belongs to local group g. Rows past sum(group_sizes) belong to no group."""
    ends = jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))
    starts = ends - jnp.maximum(group_sizes.astype(jnp.int32), 0)
    local = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local_groups, dtype=jnp.int32)
    rows = jnp.arange(m, dtype=jnp.int32)
    return (rows[None, :] >= starts[local][:, None]) & (rows[None, :] < ends[local][:, None])


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None, group_offset=0):
    """out[i] = lhs[i] @ rhs[g(i) - group_offset] for rows of local groups, 0 elsewhere.

    lhs: [M, K]; rhs: [G_local, K, N] ([G_local, N, K] if transpose_rhs); group_sizes: [G] int32.
    Returns [M, N] in preferred_element_type (default: the promoted input dtype).
    """
    out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    masks = _row_masks(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), acc_dtype)
    for g in range(rhs.shape[0]):
        w = rhs[g].T if transpose_rhs else rhs[g]
        y = jnp.matmul(lhs, w, preferred_element_type=acc_dtype)
        out = out + jnp.where(masks[g][:, None], y, 0)
    return out.astype(out_dtype)


def tgmm_reference(lhs, grad, group_sizes, *, num_groups=None, preferred_element_type=None, group_offset=0):
    """out[g] = lhs[rows of g]^T @ grad[rows of g] for local groups g.

    lhs: [M, K]; grad: [M, N]; group_sizes: [G] int32. Returns [num_groups (default G), K, N].
    """
    num_groups = group_sizes.shape[0] if num_groups is None else num_groups
    out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, grad.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    masks = _row_masks(group_sizes, lhs.shape[0], group_offset, num_groups)
    outs = []
    for g in range(num_groups):
        x = jnp.where(masks[g][:, None], lhs, 0)
        dy = jnp.where(masks[g][:, None], grad, 0)
        outs.append(jnp.matmul(x.T, dy, preferred_element_type=acc_dtype))
    return jnp.stack(outs).astype(out_dtype)

