"""The attention sink: how much softmax attention mass lands on the first token of each document.

The Gated Attention paper (Qiu et al., 2025) reports that the sigmoid output gate removes most of this mass. The
probabilities come from the model itself, without touching model code: a Flax method interceptor calls every
`GatedAttention` (and its ablation siblings) with `return_probs=True`, which sows them into "intermediates".
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.layers.attention import GatedAttention
from qwen35_jax.model import check_tokens, default_inputs, module_for


def _request_probs(next_fun, args, kwargs, context):
    if isinstance(context.module, GatedAttention) and context.method_name == "__call__":
        kwargs = {**kwargs, "return_probs": True}
    return next_fun(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _intermediates_fn(cfg):
    def run(params, tokens_BT, segment_ids_BT, positions_BT):
        with nn.intercept_methods(_request_probs):
            _, state = module_for(cfg).apply({"params": params}, tokens_BT, segment_ids_BT, positions_BT,
                                             mutable=["intermediates"])
        return state["intermediates"]
    return jax.jit(run)


def attention_probs(cfg, params, tokens, *, segment_ids=None, positions=None) -> list:
    """Attention probabilities of every attention layer, in model order: a list of [B, H, T, T] fp32 arrays."""
    check_tokens(cfg, tokens)
    seg, pos = default_inputs(tokens, segment_ids, positions)
    inter = _intermediates_fn(cfg)(params, jnp.asarray(tokens, jnp.int32), seg, pos)
    period = {}  # block_j -> [groups, B, H, T, T]; the scanned stack stacks the period's groups on axis 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(inter.get("layers", {}))[0]:
        names = [getattr(p, "key", None) for p in path]
        if "attn_probs" in names:
            period[next(n for n in names if str(n).startswith("block_"))] = leaf
    order = sorted(period, key=lambda n: int(n.split("_")[1]))
    groups = next(iter(period.values())).shape[0] if period else 0
    return [period[name][g] for g in range(groups) for name in order]


def first_token_share(probs_BHTS, segment_ids_BT) -> jnp.ndarray:
    """Mean attention mass on each query's document-first token, over heads and scored queries: every non-padding
    query except its document's first token (which can only attend to itself)."""
    B, T = segment_ids_BT.shape
    idx = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    first_BT = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)            # position of the document's first token
    mass_BHT = jnp.take_along_axis(probs_BHTS, first_BT[:, None, :, None], axis=-1)[..., 0]
    scored_BT = (segment_ids_BT != 0) & ~starts
    w = jnp.broadcast_to(scored_BT[:, None], mass_BHT.shape).astype(mass_BHT.dtype)
    return jnp.sum(mass_BHT * w) / jnp.maximum(jnp.sum(w), 1.0)


def attention_sink_share(cfg, params, tokens, *, segment_ids=None, positions=None) -> dict:
    """{"mean": share averaged over attention layers, "per_layer": [share per attention layer]} as floats; NaN mean
    when the pattern has no attention layer."""
    seg, _ = default_inputs(tokens, segment_ids, positions)
    per_layer = [float(first_token_share(p, seg)) for p in attention_probs(cfg, params, tokens,
                                                                            segment_ids=segment_ids,
                                                                            positions=positions)]
    return {"mean": float(np.mean(per_layer)) if per_layer else float("nan"), "per_layer": per_layer}
