"""The gated delta rule (Gated DeltaNet), with the API of flash-linear-attention's `chunk_gated_delta_rule`.

Implementations (`impl`): "recurrent" (per-token scan: the reference and the decode path), "xla" (chunked
jax.numpy: the portable fast path for CPU and GPU), "pallas" (fused Mosaic TPU kernels, forward and backward;
interpret mode off TPU), "auto" (pallas on TPU, else xla).
"""

from __future__ import annotations

from pallas_kernels import target

from .chunked import chunked_gated_delta_rule
from .pallas_tpu import pallas_gated_delta_rule
from .reference import gated_delta_rule_step, recurrent_gated_delta_rule

IMPLS = ("auto", "recurrent", "xla", "pallas")


def check_shapes(q, k, v, g, beta, initial_state, segment_ids):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, Hk, dk = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B={B}, T={T}, Hv, dv]; got {tuple(v.shape)}")
    Hv, dv = v.shape[2:]
    if Hv % Hk:
        raise ValueError(f"value heads Hv={Hv} (v {tuple(v.shape)}) must be a multiple of key heads Hk={Hk} "
                         f"(q {tuple(q.shape)})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}; got {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, Hv, dk, dv):
        raise ValueError(f"initial_state must be [B, Hv, dk, dv] = {(B, Hv, dk, dv)}; got "
                         f"{tuple(initial_state.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)}; got {tuple(segment_ids.shape)}")


def default_impl() -> str:
    return "pallas" if target.on_tpu() else "xla"


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           segment_ids=None, use_qk_l2norm=False, chunk_size=64, impl="auto", interpret=None):
    """Gated delta rule over a sequence. Returns (o [B, T, Hv, dv] in v's dtype, final state or None).

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv] (value head h reads key head h // (Hv / Hk)); g (log decay, <= 0) and
    beta [B, T, Hv]; initial/final state [B, Hv, dk, dv] fp32; `segment_ids [B, T]` restarts the state at each new
    id (packed documents); `scale` defaults to dk ** -0.5 and multiplies q after the optional l2norm.
    """
    check_shapes(q, k, v, g, beta, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two (the triangular inverse doubles blocks); got {chunk_size}")
    if impl == "auto":
        impl = default_impl()
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm)
    if impl == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if impl == "pallas":
        if chunk_size < 16:
            raise ValueError(f"impl='pallas' needs chunk_size >= 16 (a [chunk, d] block must fill whole bf16 "
                             f"sublane tiles); got {chunk_size}")
        return pallas_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, interpret=interpret, **kwargs)
    return chunked_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)


__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "gated_delta_rule_step",
           "chunked_gated_delta_rule", "pallas_gated_delta_rule"]
