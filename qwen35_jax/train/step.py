"""The jitted train and eval steps. Training state is a plain pytree: {"step", "params", "opt_state"}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qwen35_jax.config import ModelConfig
from qwen35_jax.model import forward, lm_head
from qwen35_jax.precision import recipe
from qwen35_jax.train.config import TrainConfig
from qwen35_jax.train.losses import expert_load_imbalance, head_loss_sums

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def init_state(params, tx) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def model_inputs(batch) -> dict:
    """Positions (and vision inputs) of a batch for `forward`: image-text rows (data/multimodal.py) carry mRoPE
    positions [B, 3, T] and the vision arrays [B, N, ...] under "vision"."""
    if "vision" in batch:
        return {"positions": jnp.moveaxis(batch["positions"], 1, 0), "vision": batch["vision"]}
    return {"positions": batch["positions"]}


def _router_stats(aux):
    """Router statistics of every routed layer, the MTP layer's joined to the rest (it is balanced with them)."""
    stats = aux["router"]
    if stats is not None and aux.get("mtp_router") is not None:
        stats = jax.tree.map(lambda main, mtp: jnp.concatenate([main, mtp[None]]), stats, aux["mtp_router"])
    return stats


def _uses_mtp(model_cfg: ModelConfig, tcfg: TrainConfig) -> bool:
    return tcfg.mtp_lambda > 0 and model_cfg.mtp_num_layers > 0


def router_layers(model_cfg: ModelConfig, tcfg: TrainConfig) -> int:
    """How many routers see every token: the MoE layers, plus the MTP layer's when MTP trains."""
    if not model_cfg.is_moe:
        return 0
    return sum(k == "moe" for k in model_cfg.ffn_pattern) + (model_cfg.mtp_num_layers if _uses_mtp(model_cfg, tcfg)
                                                              else 0)


def global_norms(model_cfg: ModelConfig, tcfg: TrainConfig, batch) -> dict:
    """The whole step's normalisers, computed from the global batch before it is split into micro-batches, so
    that per-micro-batch losses add up to the global-batch loss exactly: target tokens (CE, z-loss), MTP targets,
    and router token-slots (routers x non-padding tokens: the load-balancing and router z denominators)."""
    norms = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)}
    if _uses_mtp(model_cfg, tcfg):
        norms["mtp_tokens"] = jnp.maximum(jnp.sum(mtp_targets_and_mask(batch)[1]), 1.0)
    if model_cfg.is_moe:
        real = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
        norms["router_tokens"] = jnp.maximum(router_layers(model_cfg, tcfg) * real, 1.0)
    return norms


def loss_and_metrics(model_cfg: ModelConfig, tcfg: TrainConfig, params, batch, norms, router_f=None):
    """This micro-batch's share of the step loss (normalised by the global `norms`, so shares add up exactly), and
    its metric sums.

    The load-balancing loss `E * sum_e f_e P_e` over the global batch is linear in P (the mean router probability)
    for a given f (the share of assignments, not differentiable): with `router_f` [E], the pooled f of the whole
    global batch, each micro-batch contributes `E * sum_e f_e * probs_e / router_tokens` and the shares sum to the
    pooled loss, gradient included. Without it (one micro-batch) f comes from this batch's own counts.
    """
    use_mtp, fp8 = _uses_mtp(model_cfg, tcfg), recipe(tcfg)
    h_BTD, aux = forward(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                         return_aux=True, **model_inputs(batch),
                         mtp_tokens=batch["targets"] if use_mtp else None, fp8=fp8, logits=False)

    def head(x_BTD):
        return lm_head(model_cfg, params, x_BTD, fp8)

    ce_sum, z_sum = head_loss_sums(head, h_BTD, batch["targets"], batch["loss_mask"], tcfg.loss_chunks)
    total = ce_sum / norms["tokens"]
    metrics = {"ce_sum": ce_sum}
    if use_mtp:  # position t predicts token t+2 (= targets[t+1]) inside the same document
        mtp_targets, mtp_mask = mtp_targets_and_mask(batch)
        mtp_sum, _, correct = head_loss_sums(head, aux["mtp_hidden"], mtp_targets, mtp_mask, tcfg.loss_chunks,
                                             count_correct=True)
        total = total + tcfg.mtp_lambda * mtp_sum / norms["mtp_tokens"]
        metrics.update(mtp_loss_sum=mtp_sum, mtp_correct=correct)
    if tcfg.z_loss:
        total = total + tcfg.z_loss * z_sum / norms["tokens"]
        metrics["z_loss_sum"] = z_sum
    stats = _router_stats(aux)
    if stats is not None:
        pooled = {k: jnp.sum(v, axis=0) for k, v in stats.items()}  # over routed layers
        if tcfg.router_aux_loss:
            f_E = router_f if router_f is not None else jax.lax.stop_gradient(pooled["counts"] / norms["router_tokens"])
            lb_share = model_cfg.num_experts * jnp.sum(f_E * pooled["probs"]) / norms["router_tokens"]
            total = total + model_cfg.router_aux_loss_coef * lb_share
        if tcfg.router_z_loss:
            total = total + tcfg.router_z_loss * pooled["z_sq"] / norms["router_tokens"]
        metrics.update(router_counts=pooled["counts"], router_probs=pooled["probs"], router_z_sq=pooled["z_sq"],
                       expert_counts=stats["counts"])
    return total, metrics


def pooled_router_f(model_cfg: ModelConfig, tcfg: TrainConfig, params, micro, norms):
    """f_e of the whole global batch (share of top-k assignments per expert, pooled over routed layers and every
    micro-batch): a forward-only pass over the micro-batches (no gradient; the logits are dead code to XLA)."""
    use_mtp = _uses_mtp(model_cfg, tcfg)

    def body(counts_E, mb):
        _, aux = forward(model_cfg, params, mb["tokens"], segment_ids=mb["segment_ids"], return_aux=True,
                         mtp_tokens=mb["targets"] if use_mtp else None, fp8=recipe(tcfg), logits=False,
                         **model_inputs(mb))
        return counts_E + jnp.sum(_router_stats(aux)["counts"], axis=0), None

    counts_E, _ = jax.lax.scan(body, jnp.zeros((model_cfg.num_experts,), jnp.float32), micro)
    return jax.lax.stop_gradient(counts_E / norms["router_tokens"])


def make_grad_fn(model_cfg: ModelConfig, tcfg: TrainConfig):
    """(params, batch) -> (total loss, grads, metric sums, norms) of the whole global batch, in `grad_accum`
    micro-batches whose losses and gradients add up to the one-batch values (router balancing included)."""
    accum = tcfg.optimizer.grad_accum

    def grads_of(params, batch):
        norms = global_norms(model_cfg, tcfg, batch)
        if accum == 1:
            grad_fn = jax.value_and_grad(lambda p, mb: loss_and_metrics(model_cfg, tcfg, p, mb, norms), has_aux=True)
            (loss, metrics), grads = grad_fn(params, batch)
            return loss, grads, metrics, norms
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
        router_f = None
        if model_cfg.is_moe and tcfg.router_aux_loss:  # f must be the global batch's before any backward pass
            router_f = pooled_router_f(model_cfg, tcfg, params, micro, norms)
        grad_fn = jax.value_and_grad(lambda p, mb: loss_and_metrics(model_cfg, tcfg, p, mb, norms, router_f),
                                     has_aux=True)

        def body(carry, mb):
            (loss, metrics), grads = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (loss, grads, metrics)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (loss0, metrics0), grads0 = jax.eval_shape(lambda: grad_fn(params, first))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, grads0, metrics0))
        (loss, grads, metrics), _ = jax.lax.scan(body, zeros, micro)
        return loss, grads, metrics, norms

    return grads_of


def make_train_step(model_cfg: ModelConfig, tcfg: TrainConfig, tx, lr_schedule):
    grads_of = make_grad_fn(model_cfg, tcfg)

    def train_step(state, batch):
        loss, grads, metrics, norms = grads_of(state["params"], batch)
        num_tokens = norms["tokens"]
        grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"step": state["step"] + 1, "params": keep(new_params, state["params"]),
                     "opt_state": keep(new_opt_state, state["opt_state"])}
        out = {"loss": metrics.pop("ce_sum") / num_tokens, "total_loss": loss, "grad_norm": grad_norm,
               "lr": lr_schedule(state["step"]), "finite": finite, "tokens": num_tokens}
        out.update(router_metrics(model_cfg, metrics, norms))
        if "z_loss_sum" in metrics:
            out["z_loss"] = metrics.pop("z_loss_sum") / num_tokens
        if "mtp_loss_sum" in metrics:
            out["mtp_loss"] = metrics.pop("mtp_loss_sum") / norms["mtp_tokens"]
            out["mtp_accuracy"] = metrics.pop("mtp_correct") / norms["mtp_tokens"]
        return new_state, out

    return train_step


def router_metrics(model_cfg: ModelConfig, metrics: dict, norms: dict) -> dict:
    """The global batch's load-balancing loss, router z-loss and expert imbalance, from the pooled sums."""
    if "router_counts" not in metrics:
        return {}
    T = norms["router_tokens"]
    f_E, p_E = metrics["router_counts"] / T, metrics["router_probs"] / T
    return {"router_aux": model_cfg.num_experts * jnp.sum(f_E * p_E), "router_z_loss": metrics["router_z_sq"] / T,
            "expert_imbalance": expert_load_imbalance(metrics["expert_counts"])}


def mtp_targets_and_mask(batch):
    """Targets of the MTP head (token t+2 at position t) and where they count (same document, both targets real)."""
    targets = jnp.concatenate([batch["targets"][:, 1:], batch["targets"][:, -1:]], axis=1)
    seg = batch["segment_ids"]
    same_doc = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], bool)], axis=1)
    next_mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    return targets, batch["loss_mask"] * next_mask * same_doc


def make_eval_step(model_cfg: ModelConfig, loss_chunks: int = 1):
    def eval_step(params, batch):
        h_BTD = forward(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"], logits=False,
                        **model_inputs(batch))
        ce_sum, _ = head_loss_sums(lambda x: lm_head(model_cfg, params, x), h_BTD, batch["targets"],
                                   batch["loss_mask"], loss_chunks)
        return ce_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return eval_step
