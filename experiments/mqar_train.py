"""MQAR training: a small self-contained AdamW loop on `qwen35_jax.forward`, scored by test accuracy.

The loss is the cross entropy at the scored value positions only (zoology's convention), and the LM head runs at
those positions only: a row scores at most T / 4 queries (`mqar` allows no more pairs), so the [B, T, D] hidden
states are gathered to [B, T / 4, D] rows before the head; with zoology's 8192-token vocabulary the head over every
position was most of a step. The learning rate is an
argument of the jitted step rather than a constant in it, so every learning rate of a variant and sequence length
reuses one compiled program. The host hands over `LOG_EVERY` steps' batches at once and one compiled call runs them
as a `lax.scan` (no host round trip, dispatch or loss transfer per step: the per-step overhead dominated at these
model sizes).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments.mqar import SCORES, mqar, mqar_scores
from qwen35_jax.config import ModelConfig
from qwen35_jax.model import forward, init_params, lm_head
from qwen35_jax.train.config import OptimConfig
from qwen35_jax.train.optimizer import decay_mask, schedule

TEST_SEED_OFFSET = 1_000_003  # test rows come from another stream than training rows
LOG_EVERY = 10  # steps per compiled call, and per point of the loss curve


def scored_rows(mask_BT):
    """[B, T / 4] positions that hold every scored position of each row (in order), then unscored ones as filler."""
    order_BT = jnp.argsort(-mask_BT, axis=1, stable=True)
    return order_BT[:, : max(1, mask_BT.shape[1] // 4)]


def scored_logits(cfg: ModelConfig, params, tokens_BT, mask_BT):
    """(fp32 logits [B, P, V] at the positions `scored_rows` picks, those positions [B, P])."""
    h_BTD = forward(cfg, params, tokens_BT, logits=False)
    at_BP = scored_rows(mask_BT)
    return lm_head(cfg, params, jnp.take_along_axis(h_BTD, at_BP[..., None], axis=1)), at_BP


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT):
    """Mean cross entropy over the positions where `mask_BT` is 1 (targets elsewhere may be -100)."""
    safe = jnp.where(mask_BT > 0, targets_BT, 0)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), safe)
    return jnp.sum(ce_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


@functools.lru_cache(maxsize=8)
def programs(cfg: ModelConfig, steps: int, warmup_steps: int, weight_decay: float, clip_norm: float,
             lr_schedule: str):
    """(init, steps, predict) jitted functions; `steps(state, batches, lr)` applies AdamW (the peak lr an input) once
    per leading index of `batches` (each leaf [K, B, T]) and returns the K losses; `predict(params, tokens, loss_mask)`
    is the argmax [B, T] at the scored positions (-1 elsewhere).

    AdamW is written out as clip -> Adam scaling -> decoupled weight decay -> schedule shape, then scaled by -lr:
    the same update as `optax.adamw(lr * shape)`.
    """
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ocfg = OptimConfig(lr=1.0, warmup_steps=warmup_steps, weight_decay=weight_decay, clip_norm=clip_norm,
                       schedule=lr_schedule)
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask(shapes, ocfg)),
        optax.scale_by_schedule(schedule(ocfg, steps)),
    )

    def init(key):
        params = init_params(cfg, key)
        return {"params": params, "opt_state": tx.init(params)}

    def loss_fn(params, batch):
        logits_BPV, at_BP = scored_logits(cfg, params, batch["tokens"], batch["loss_mask"])
        pick = functools.partial(jnp.take_along_axis, indices=at_BP, axis=1)
        return masked_cross_entropy(logits_BPV, pick(batch["targets"]), pick(batch["loss_mask"]))

    def step(state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state["params"], updates)
        return {"params": params, "opt_state": opt_state}, loss

    def steps(state, batches, lr):
        return jax.lax.scan(lambda st, batch: step(st, batch, lr), state, batches)

    def predict(params, tokens_BT, mask_BT):  # argmax at the scored positions, -1 elsewhere
        logits_BPV, at_BP = scored_logits(cfg, params, tokens_BT, mask_BT)
        rows = jnp.arange(tokens_BT.shape[0])[:, None]
        pred_BP = jnp.where(jnp.take_along_axis(mask_BT, at_BP, axis=1) > 0, jnp.argmax(logits_BPV, -1), -1)
        return jnp.full(tokens_BT.shape, -1, jnp.int32).at[rows, at_BP].set(pred_BP.astype(jnp.int32))

    return jax.jit(init), jax.jit(steps, donate_argnums=0), jax.jit(predict)


def evaluate(predict_fn, params, data: dict, batch_size: int) -> dict[str, float]:
    """`mqar_scores` (accuracy, value_in_context) over all rows, in chunks of `batch_size` (the last chunk padded with
    unscored rows)."""
    n = len(data["tokens"])
    totals, scored = dict.fromkeys(SCORES, 0.0), 0.0
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in data.items()}
        rows = len(chunk["tokens"])
        if rows < batch_size:  # keep one compiled shape: repeat the last row, unscored
            pad = {k: np.repeat(v[-1:], batch_size - rows, 0) for k, v in chunk.items()}
            pad["loss_mask"] = np.zeros_like(pad["loss_mask"])
            chunk = {k: np.concatenate([v, pad[k]]) for k, v in chunk.items()}
        pred = np.asarray(predict_fn(params, chunk["tokens"], chunk["loss_mask"]))
        mask_sum = float(chunk["loss_mask"].sum())
        if mask_sum:
            for name, value in mqar_scores(pred, chunk).items():
                totals[name] += value * mask_sum
            scored += mask_sum
    return {name: total / scored if scored else float("nan") for name, total in totals.items()}


def _training_rows(gen, n: int, seq_len: int, mix, seed: int) -> dict[str, np.ndarray]:
    """`n` training rows; with a pair-count `mix`, split evenly over its entries (the first ones take the remainder),
    each part from its own stream, concatenated (training draws them in a shuffled order)."""
    if not mix:
        return gen(n, seq_len, seed=seed)
    sizes = [n // len(mix) + (j < n % len(mix)) for j in range(len(mix))]
    parts = [gen(m, seq_len, num_kv_pairs=p, seed=[seed, j, p]) for j, (m, p) in enumerate(zip(sizes, mix))]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def train_mqar(cfg: ModelConfig, *, seq_len: int, lr: float, settings: dict, seed: int = 0, desc: str = "mqar"):
    """Train `cfg` on MQAR at `seq_len` and return {"metrics": {...}, "train_loss": [(step, loss), ...]}.

    `settings` is the sweep's mqar section with `num_kv_pairs` and `batch_size` resolved to ints for this seq_len.
    """
    s = settings
    gen = functools.partial(mqar, vocab_size=s["vocab_size"], num_kv_pairs=s["num_kv_pairs"], power_a=s["power_a"],
                            random_non_queries=s["random_non_queries"])
    train = _training_rows(gen, s["train_examples"], seq_len, s.get("train_kv_pairs"), seed)
    test = gen(s["test_examples"], seq_len, seed=seed + TEST_SEED_OFFSET)
    init, steps_fn, predict_fn = programs(cfg, s["steps"], s["warmup_steps"], s["weight_decay"], s["clip_norm"],
                                         s["lr_schedule"])
    state = init(jax.random.key(seed))  # the same initial weights for every learning rate
    rng = np.random.default_rng(seed)
    B, n = s["batch_size"], len(train["tokens"])
    order, pos = rng.permutation(n), 0

    def next_rows():
        nonlocal order, pos
        if pos + B > n:  # a new epoch: reshuffle
            order, pos = rng.permutation(n), 0
        pos += B
        return order[pos - B:pos]

    curve = []
    t0, timed_steps = time.perf_counter(), 0  # the clock restarts after the first (compiling) call
    bar = tqdm(total=s["steps"], desc=desc, leave=False, dynamic_ncols=True, unit="step")
    lr_arr = jnp.asarray(lr, jnp.float32)
    done = 0
    while done < s["steps"]:
        k = min(LOG_EVERY, s["steps"] - done)  # a shorter last call compiles once more
        idx = np.stack([next_rows() for _ in range(k)])  # [k, B]
        state, losses = steps_fn(state, {name: v[idx] for name, v in train.items()}, lr_arr)
        recent = float(np.mean(jax.device_get(losses)))
        if done == 0:  # throughput counts the calls after the compiling one
            t0 = time.perf_counter()
        else:
            timed_steps += k
        done += k
        curve.append((done, recent))
        bar.update(k)
        bar.set_postfix(loss=f"{recent:.3f}", refresh=False)
    bar.close()
    train_s = time.perf_counter() - t0
    scores = evaluate(predict_fn, state["params"], test, s["eval_batch_size"])
    final_loss = curve[-1][1] if curve else float("nan")
    metrics = {**scores, "train_loss": final_loss,
               "tokens_per_s": timed_steps * B * seq_len / train_s if timed_steps else float("nan")}
    return {"metrics": metrics, "train_loss": curve}


__all__ = ["train_mqar", "masked_cross_entropy", "scored_rows", "programs", "evaluate", "LOG_EVERY"]
