"""TPU attention through the splash (flash) kernel that JAX ships (`jax.experimental.pallas.ops.tpu.splash_attention`).

The model's mask is splash's static causal (or sliding-window `LocalMask`) mask and'ed with document segment ids;
GQA is splash's grouped MHA (query head h reads kv head h // (H / G)); the softmax scale is folded into q; the output
gate is applied by the caller. Block sizes: 512 (capped by the sequence and kept a multiple of 128). With
`q_seq_shards = N` the kernel is built for the whole [T, S] mask and its mask tables are split into N query shards
(`shard_spec` gives the shard_map spec): under context parallelism each device passes its local queries against the
gathered keys and gets exactly its rows of the global mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

LANES = 128


def _block(n: int, want: int = 512) -> int:
    b = min(want, n)
    while n % b:
        b //= 2
    return b


def supported(T_local: int, S: int, head_dim: int) -> str | None:
    """None if splash can run these shapes, else why not (one line)."""
    if S % LANES or T_local % LANES:
        return f"splash attention needs sequence lengths that are multiples of {LANES} (got q {T_local}, kv {S})"
    if head_dim % LANES:
        return f"splash attention needs head_dim a multiple of {LANES} (got {head_dim})"
    return None


@functools.lru_cache(maxsize=32)
def make_kernel(T: int, S: int, num_heads: int, sliding_window: int = 0, q_seq_shards: int = 1,
                head_shards: int = 1, interpret: bool = False):
    """The splash kernel for a global [T, S] causal (or windowed) mask over `num_heads` query heads."""
    if sliding_window:
        one = sm.LocalMask((T, S), window_size=(sliding_window - 1, 0), offset=0)
    else:
        one = sm.CausalMask((T, S))
    mask = sm.MultiHeadMask([one] * num_heads)
    bq, bk = _block(T // q_seq_shards), _block(S)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=head_shards, q_seq_shards=q_seq_shards,
                              interpret=interpret)


def shard_spec(kernel, mesh, head_axis, seq_axis):
    """The shard_map in_spec of a kernel built with `head_shards`/`q_seq_shards` matching these mesh axes."""
    return kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(head_axis,
                                                                                                   seq_axis)))


def splash_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, *, sliding_window: int = 0,
                     kernel=None, interpret: bool = False):
    """o [B, T, H, K] in v's dtype. `kernel` (from `make_kernel`) defaults to a one-shard kernel for these shapes."""
    B, T, H, K = q_BTHK.shape
    S = k_BSGK.shape[1]
    why = supported(T, S, K)
    if why:
        raise ValueError(why)
    if kernel is None:
        kernel = make_kernel(T, S, H, sliding_window, interpret=interpret)
    q = jnp.swapaxes(q_BTHK * jnp.asarray(K ** -0.5, q_BTHK.dtype), 1, 2)   # [B, H, T, K]
    k, v = jnp.swapaxes(k_BSGK, 1, 2), jnp.swapaxes(v_BSGK, 1, 2)            # [B, G, S, K]
    seg = sk.SegmentIds(q=jnp.asarray(q_segment_ids_BT, jnp.int32), kv=jnp.asarray(kv_segment_ids_BS, jnp.int32))
    o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)
    return jnp.swapaxes(o, 1, 2).astype(v_BSGK.dtype)


__all__ = ["splash_attention", "make_kernel", "shard_spec", "supported"]
