"""The jitted train and eval steps. Training state is a plain pytree: {"step", "params", "opt_state"}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qwen35_jax.config import ModelConfig
from qwen35_jax.model import forward
from qwen35_jax.precision import recipe
from qwen35_jax.train.config import TrainConfig
from qwen35_jax.train.losses import cross_entropy_sum, expert_load_imbalance, load_balancing_loss, router_z_loss

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def init_state(params, tx) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def loss_and_metrics(model_cfg: ModelConfig, tcfg: TrainConfig, params, batch, num_tokens):
    """Loss normalised by `num_tokens` (the whole step's target count, so micro-batches add up exactly)."""
    use_mtp = tcfg.mtp_lambda > 0 and model_cfg.mtp_num_layers > 0
    logits, aux = forward(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"], return_aux=True,
                          mtp_tokens=batch["targets"] if use_mtp else None, fp8=recipe(tcfg))
    ce_sum, z_sum = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
    ce = ce_sum / num_tokens
    total = ce
    metrics = {"ce_sum": ce_sum}
    if use_mtp:  # position t predicts token t+2 (= targets[t+1]) inside the same document
        mtp_targets, mtp_mask = mtp_targets_and_mask(batch)
        mtp_sum, _ = cross_entropy_sum(aux["mtp_logits"], mtp_targets, mtp_mask)
        mtp_count = jnp.maximum(jnp.sum(mtp_mask), 1.0)
        total = total + tcfg.mtp_lambda * mtp_sum / mtp_count * (batch["tokens"].shape[0] / tcfg.batch_size)
        correct = jnp.argmax(aux["mtp_logits"], -1) == mtp_targets
        metrics.update(mtp_loss_sum=mtp_sum, mtp_correct=jnp.sum(correct * mtp_mask), mtp_count=mtp_count)
    if tcfg.z_loss:
        total = total + tcfg.z_loss * z_sum / num_tokens
        metrics["z_loss_sum"] = z_sum
    stats = aux["router"]
    if stats is not None and aux.get("mtp_router") is not None:  # the MTP layer's router is balanced with the rest
        stats = jax.tree.map(lambda main, mtp: jnp.concatenate([main, mtp[None]]), stats, aux["mtp_router"])
    if stats is not None:
        lb = load_balancing_loss(stats, model_cfg.num_experts)
        if tcfg.router_aux_loss:
            total = total + model_cfg.router_aux_loss_coef * lb * batch["tokens"].shape[0] / tcfg.batch_size
        metrics["router_aux"] = lb
        if tcfg.router_z_loss:
            rz = router_z_loss(stats)
            total = total + tcfg.router_z_loss * rz * batch["tokens"].shape[0] / tcfg.batch_size
            metrics["router_z"] = rz
        metrics["expert_counts"] = stats["counts"]
    return total, metrics


def mtp_targets_and_mask(batch):
    targets = jnp.concatenate([batch["targets"][:, 1:], batch["targets"][:, -1:]], axis=1)
    seg = batch["segment_ids"]
    same_doc = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], bool)], axis=1)
    next_mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    return targets, batch["loss_mask"] * next_mask * same_doc


def make_train_step(model_cfg: ModelConfig, tcfg: TrainConfig, tx, lr_schedule):
    accum = tcfg.optimizer.grad_accum

    def train_step(state, batch):
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        grad_fn = jax.value_and_grad(
            lambda p, mb: loss_and_metrics(model_cfg, tcfg, p, mb, num_tokens), has_aux=True)
        if accum == 1:
            (loss, metrics), grads = grad_fn(state["params"], batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, mb):
                (loss, metrics), grads = grad_fn(state["params"], mb)
                acc_loss, acc_grads, acc_metrics = carry
                return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads),
                        jax.tree.map(jnp.add, acc_metrics, metrics)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda: grad_fn(state["params"], first))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (loss, metrics), grads = zeros
            (loss, grads, metrics), _ = jax.lax.scan(body, (loss, grads, metrics), micro)
            for key in ("router_aux", "router_z"):  # per-micro-batch means: average them
                if key in metrics:
                    metrics[key] = metrics[key] / accum
        grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"step": state["step"] + 1, "params": keep(new_params, state["params"]),
                     "opt_state": keep(new_opt_state, state["opt_state"])}
        out = {"loss": metrics.pop("ce_sum") / num_tokens, "total_loss": loss, "grad_norm": grad_norm,
               "lr": lr_schedule(state["step"]), "finite": finite, "tokens": num_tokens}
        if "expert_counts" in metrics:
            out["expert_imbalance"] = expert_load_imbalance(metrics.pop("expert_counts"))
            out["router_aux"] = metrics.pop("router_aux")
        if "router_z" in metrics:
            out["router_z_loss"] = metrics.pop("router_z")
        if "z_loss_sum" in metrics:
            out["z_loss"] = metrics.pop("z_loss_sum") / num_tokens
        if "mtp_loss_sum" in metrics:
            count = jnp.maximum(metrics.pop("mtp_count"), 1.0)
            out["mtp_loss"] = metrics.pop("mtp_loss_sum") / count
            out["mtp_accuracy"] = metrics.pop("mtp_correct") / count
        return new_state, out

    return train_step


def make_eval_step(model_cfg: ModelConfig):
    def eval_step(params, batch):
        logits = forward(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"])
        ce_sum, _ = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
        return ce_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return eval_step
