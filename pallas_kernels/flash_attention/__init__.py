"""Causal softmax attention with document (segment id) and sliding-window masks, GQA, without the [T, S] matrix.

Implementations (`impl`): "xla_dense" (forms the [T, S] matrix in query blocks that skip
the keys past their causal bound: `dense.py` over `reference.py`), "xla_blocked" (online softmax over key
blocks in jax.numpy with a recomputing custom VJP: CPU and GPU), "splash" (the Pallas TPU kernel JAX ships;
interpret mode off TPU). Queries may be a slice of the sequence starting at global index `q_offset` (context
parallelism: local queries against gathered keys); splash takes that slice from a kernel built with q_seq_shards.
"""

from __future__ import annotations

from pallas_kernels import target

from .blocked import blocked_attention
from .dense import dense_attention
from .reference import mask_BTS, reference_attention

IMPLS = ("auto", "xla_dense", "xla_blocked", "splash")
DENSE_MAX = 1024  # auto: up to this many keys the [T, S] matrix is small and the dense path is faster on CPU
DENSE_BLOCK_Q = 128  # the dense path's query blocks (causal skipping): dense.py, benchmarks/README.md


def resolve_impl(impl: str, q_len: int, kv_len: int, head_dim: int) -> str:
    """The implementation `impl="auto"` means for these shapes on the target platform."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    if target.on_tpu():
        from .splash import supported

        return "splash" if supported(q_len, kv_len, head_dim) is None else "xla_blocked"
    return "xla_dense" if kv_len <= DENSE_MAX else "xla_blocked"


def flash_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, *, q_offset=0,
                    sliding_window: int = 0, impl: str = "auto", kernel=None, interpret=None,
                    block_q: int = 512, block_k: int = 512):
    """o [B, T, H, K] in v's dtype; query head h reads kv head h // (H / G); scale head_dim ** -0.5; the mask of
    `reference.mask_BTS`. `kernel`: a prebuilt splash kernel (`splash.make_kernel`), which then owns the offset."""
    impl = resolve_impl(impl, q_BTHK.shape[1], k_BSGK.shape[1], q_BTHK.shape[-1])
    if impl == "xla_dense":
        return dense_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, q_offset=q_offset,
                               sliding_window=sliding_window, block_q=DENSE_BLOCK_Q)
    if impl == "xla_blocked":
        return blocked_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS, q_offset=q_offset,
                                 sliding_window=sliding_window, block_q=block_q, block_k=block_k)
    from .splash import splash_attention

    interpret = (not target.on_tpu()) if interpret is None else interpret
    return splash_attention(q_BTHK, k_BSGK, v_BSGK, q_segment_ids_BT, kv_segment_ids_BS,
                            sliding_window=sliding_window, kernel=kernel, interpret=interpret)


__all__ = ["flash_attention", "blocked_attention", "dense_attention", "reference_attention", "mask_BTS", "resolve_impl",
           "IMPLS"]
