"""Gated linear attention (a scalar decay per head, no delta rule; g = 0: plain linear attention), with the API of
`pallas_kernels.gated_delta_rule.chunk_gated_delta_rule` less `beta`: the ablation siblings of Gated DeltaNet.

Implementations (`impl`): "recurrent" (per-token scan: the reference and the decode path), "xla" (chunked
jax.numpy, every backend), "auto" (xla). There is no Pallas kernel: "pallas" is refused rather than ignored.
"""

from __future__ import annotations

from pallas_kernels.gated_delta_rule import check_shapes

from .chunked import chunked_gated_linear_attention
from .reference import recurrent_gated_linear_attention, recurrent_gated_linear_attention_states

IMPLS = ("auto", "recurrent", "xla")


def chunk_gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                                 segment_ids=None, use_qk_l2norm=False, chunk_size=64, impl="auto"):
    """Returns (o [B, T, Hv, dv] in v's dtype, final state [B, Hv, dk, dv] or None); shapes as the delta rule's."""
    check_shapes(q, k, v, g, g, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"gated linear attention impl {impl!r} is not one of {IMPLS} (no Pallas kernel: the "
                         f"decay-only and plain variants run the chunked XLA form; set gdn_impl=auto or xla)")
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm)
    if impl == "recurrent":
        return recurrent_gated_linear_attention(q, k, v, g, **kwargs)
    return chunked_gated_linear_attention(q, k, v, g, chunk_size=chunk_size, **kwargs)


__all__ = ["chunk_gated_linear_attention", "chunked_gated_linear_attention", "recurrent_gated_linear_attention",
           "recurrent_gated_linear_attention_states"]
