"""Gradient accumulation changes nothing but memory: grad_accum=k gives the one-batch loss, gradient and router
statistics for the same global batch, the load-balancing loss included (pooled over the whole global batch, as
Qwen's global-batch balancing prescribes), while per-micro-batch balancing would give a different loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import init_params, load_config
from qwen35_jax.model import forward
from qwen35_jax.train.config import load_train_config
from qwen35_jax.train.losses import load_balancing_loss
from qwen35_jax.train.step import make_grad_fn, router_metrics

B, T = 4, 12


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("tiny", vocab_size=97, hidden_size=32, num_layers=2, layer_pattern="GA", num_heads=2,
                      num_kv_heads=1, head_dim=16,
                      gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=16, gdn_value_dim=16, gdn_chunk_size=8,
                      num_experts=8, experts_per_token=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      mtp_num_layers=1, router_aux_loss_coef=0.5)
    params = init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    seg = np.ones((B, T), np.int32)
    seg[1, 7:] = 2  # a packed row
    seg[2, :3] = 0  # left padding
    mask = (seg != 0).astype(np.float32)
    mask[3, 5:] = 0  # a row with fewer targets
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": seg,
             "positions": np.broadcast_to(np.arange(T), (B, T)).copy(), "loss_mask": mask}
    return cfg, params, {k: jnp.asarray(v) for k, v in batch.items()}


def run(cfg, params, batch, accum, **extra):
    tcfg = load_train_config(None, {"optimizer.grad_accum": accum, "batch_size": B, "seq_len": T, "mtp_lambda": 0.3,
                                    "router_z_loss": 0.01, "z_loss": 1e-3, **extra})
    loss, grads, metrics, norms = jax.jit(make_grad_fn(cfg, tcfg))(params, batch)
    return loss, grads, {**metrics, **router_metrics(cfg, metrics, norms)}


@pytest.fixture(scope="module")
def results(setup):
    """One compile each: one batch, two micro-batches, two micro-batches without the load-balancing loss."""
    cfg, params, batch = setup
    return {"one": run(cfg, params, batch, 1), "two": run(cfg, params, batch, 2),
            "two_no_lb": run(cfg, params, batch, 2, router_aux_loss=False)}


def test_accumulated_micro_batches_equal_one_batch(results):
    loss1, grads1, m1 = results["one"]
    loss, grads, m = results["two"]
    np.testing.assert_allclose(loss, loss1, rtol=2e-6)
    for key in ("router_aux", "router_z_loss", "ce_sum", "mtp_loss_sum"):
        np.testing.assert_allclose(m[key], m1[key], rtol=2e-6, err_msg=key)
    for (path, g), g1 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_load_balancing_is_pooled_over_the_global_batch(setup, results):
    """The reported loss is the formula on the global batch's pooled statistics, computed here from a plain
    forward (an independent path), and it differs from the mean of per-micro-batch losses."""
    cfg, params, batch = setup
    m = results["two"][2]
    _, aux = forward(cfg, params, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                     mtp_tokens=batch["targets"], return_aux=True)
    stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), aux["router"], aux["mtp_router"])
    np.testing.assert_allclose(m["router_aux"], load_balancing_loss(stats, cfg.num_experts), rtol=1e-5)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        _, aux = forward(cfg, params, batch["tokens"][rows], segment_ids=batch["segment_ids"][rows],
                         positions=batch["positions"][rows], mtp_tokens=batch["targets"][rows], return_aux=True)
        s = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), aux["router"], aux["mtp_router"])
        halves.append(float(load_balancing_loss(s, cfg.num_experts)))
    assert abs(np.mean(halves) - float(m["router_aux"])) > 1e-4, "per-micro-batch balancing would be the same here"


def test_load_balancing_gradient_uses_the_pooled_assignment_shares(setup, results):
    """The load-balancing part of the grad_accum=2 gradient equals the gradient of E * sum_e f_e * P_e(params)
    with f fixed at the whole global batch's shares (the Switch/Qwen definition: f carries no gradient), taken by
    direct autodiff of a plain forward."""
    cfg, params, batch = setup
    g_with, g_without = results["two"][1], results["two_no_lb"][1]

    def stats_of(p, b):
        _, aux = forward(cfg, p, b["tokens"], segment_ids=b["segment_ids"], positions=b["positions"],
                         mtp_tokens=b["targets"], return_aux=True)
        return jax.tree.map(lambda x, y: jnp.concatenate([x, y[None]]), aux["router"], aux["mtp_router"])

    st = stats_of(params, batch)
    tokens = jnp.sum(st["tokens"])
    f_E = jnp.sum(st["counts"], 0) / tokens
    lb = lambda p, b: cfg.num_experts * jnp.sum(f_E * jnp.sum(stats_of(p, b)["probs"], 0) / tokens)  # noqa: E731
    g_lb = jax.jit(jax.grad(lb))(params, batch)
    for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(g_with), jax.tree.leaves(g_without),
                               jax.tree.leaves(g_lb)):
        np.testing.assert_allclose(a - b, cfg.router_aux_loss_coef * c, rtol=2e-3, atol=2e-7,
                                   err_msg=jax.tree_util.keystr(path))
