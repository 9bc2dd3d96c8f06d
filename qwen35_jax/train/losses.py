"""Training losses: masked cross-entropy, optional z-losses (logits, router), and the global-batch load-balancing
loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BTV, targets_BT, mask_BT):
    """(sum of masked token losses, sum of log-partition^2 over masked tokens), in fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    return jnp.sum((lse_BT - target_logit) * mask), jnp.sum(jnp.square(lse_BT) * mask)


def head_loss_sums(head, h_BTD, targets_BT, mask_BT, chunks: int = 1, count_correct: bool = False):
    """`cross_entropy_sum` of the logits `head(h_BTD)` [B, T, V] (and, with `count_correct`, the masked number of
    argmax hits), formed `chunks` token slices at a time.

    With chunks > 1 the slices run in a `lax.scan` whose body is rematerialised: forward and backward hold one
    slice's fp32 logits, never [B, T, V] (at a 248k vocabulary that is 1 MiB per token). Slice j holds the tokens
    t = i * chunks + j, so every slice spans the whole row and a sequence-sharded T stays split across the shards.
    """
    def sums(h, targets, mask):
        logits = head(h)
        ce, z = cross_entropy_sum(logits, targets, mask)
        if not count_correct:
            return ce, z
        return ce, z, jnp.sum((jnp.argmax(logits, -1) == targets) * mask.astype(jnp.float32))

    B, T = targets_BT.shape
    if chunks < 1 or T % chunks:
        raise ValueError(f"loss_chunks={chunks} must be >= 1 and divide the row length {T}")
    if chunks == 1:
        return sums(h_BTD, targets_BT, mask_BT)

    def split(x):  # [B, T, ...] -> [chunks, B, T / chunks, ...]
        return jnp.moveaxis(x.reshape(B, T // chunks, chunks, *x.shape[2:]), 2, 0)

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, jax.checkpoint(sums)(*xs)), None

    zero = tuple(jnp.zeros((), jnp.float32) for _ in range(3 if count_correct else 2))
    acc, _ = jax.lax.scan(body, zero, (split(h_BTD), split(targets_BT), split(mask_BT)))
    return acc


def load_balancing_loss(stats, num_experts: int):
    """Switch-style `E * sum_e f_e P_e` with statistics pooled over all MoE layers and every token of the batch.

    `stats` holds per-layer sums [L, E] of top-k assignments ("counts") and router probabilities ("probs") and the
    token counts [L]. Under jit over a sharded global batch these sums already cover the whole global batch, which is
    Qwen's global-batch balancing.
    """
    tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
    f_E = jnp.sum(stats["counts"], axis=0) / tokens
    p_E = jnp.sum(stats["probs"], axis=0) / tokens
    return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(stats):
    """ST-MoE router z-loss: mean over MoE layers and (non-padding) tokens of logsumexp(router logits)^2."""
    return jnp.sum(stats["z_sq"]) / jnp.maximum(jnp.sum(stats["tokens"]), 1.0)


def expert_load_imbalance(counts_LE):
    """max over mean of tokens per expert, averaged over MoE layers (1.0 = perfectly balanced)."""
    mean = jnp.maximum(jnp.mean(counts_LE, axis=-1), 1e-9)
    return jnp.mean(jnp.max(counts_LE, axis=-1) / mean)
