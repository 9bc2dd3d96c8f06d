"""AdamW with warmup + cosine / WSD schedules, global-norm clipping, weight-decay masks, gradient accumulation."""

from __future__ import annotations

import jax
import optax

from qwen35_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    else:  # warmup-stable-decay: hold the peak, then decay linearly over the last `decay_fraction` of the run
        decay = max(int(round(cfg.decay_fraction * total_steps)), 1)
        stable = max(total_steps - warmup - decay, 0)
        main = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [stable])
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params, cfg: OptimConfig):
    """Matrices decay; zero-centred norm weights decay (towards scale 1) if `decay_norms`; embeddings only if
    `decay_embeddings`; GDN `A_log`, `dt_bias` and the plain-weight GDN output norm never do."""

    def one(path, leaf):
        keys = [getattr(k, "key", str(k)) for k in path]
        name = keys[-1]
        if name == "embedding":
            return cfg.decay_embeddings
        if name in ("A_log", "dt_bias"):
            return False
        if name == "scale":
            gdn_output_norm = keys[-2] == "norm" and "mixer" in keys  # plain weight, not zero-centred
            return cfg.decay_norms and not gdn_output_norm
        return True

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, params) -> tuple[optax.GradientTransformation, callable]:
    lr = schedule(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask(params, cfg)),
    )
    return tx, lr
