"""`loss_chunks`: the LM heads and losses in token slices under remat change the memory, not the numbers. The
chunked step's loss, MTP metrics and gradients equal the one-slice step's, its cross-entropy equals a float64
recomputation from `forward`'s full logits, and its compiled temporaries shrink with the slices at a large
vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import init_params, load_config
from qwen35_jax.config import ConfigError
from qwen35_jax.model import forward
from qwen35_jax.train.config import load_train_config
from qwen35_jax.train.losses import head_loss_sums
from qwen35_jax.train.step import make_grad_fn, mtp_targets_and_mask

B, T = 3, 12


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T))
    seg = np.ones((B, T), np.int32)
    seg[1, 5:] = 2  # a packed row
    seg[2, :2] = 0  # padding
    mask = (seg != 0).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in {
        "tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": seg,
        "positions": np.broadcast_to(np.arange(T), (B, T)).copy(), "loss_mask": mask}.items()}


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("tiny", vocab_size=89, hidden_size=32, num_layers=2, layer_pattern="GA", num_heads=2,
                      num_kv_heads=1, head_dim=16, gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=16,
                      gdn_value_dim=16, gdn_chunk_size=4, num_experts=4, experts_per_token=2,
                      moe_intermediate_size=16, shared_expert_intermediate_size=16, mtp_num_layers=1)
    return cfg, init_params(cfg, jax.random.key(3)), _batch(cfg.vocab_size)


def _grad(cfg, params, batch, chunks):
    tcfg = load_train_config(None, {"batch_size": B, "seq_len": T, "mtp_lambda": 0.3, "z_loss": 1e-3,
                                    "loss_chunks": chunks})
    return jax.jit(make_grad_fn(cfg, tcfg))(params, batch)


def _ce64(logits, targets, mask):
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]
    return float(((lse - picked) * np.asarray(mask)).sum())


def test_chunked_step_equals_the_unchunked_one_and_a_float64_recomputation(setup):
    cfg, params, batch = setup
    loss1, grads1, m1, _ = _grad(cfg, params, batch, 1)
    loss4, grads4, m4, _ = _grad(cfg, params, batch, 4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for key in ("ce_sum", "mtp_loss_sum", "z_loss_sum", "mtp_correct"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-6, err_msg=key)
    for (path, g4), g1 in zip(jax.tree_util.tree_leaves_with_path(grads4), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))
    # independent path: forward's full logits, cross-entropy and argmax in float64 numpy
    logits, aux = forward(cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"], mtp_tokens=batch["targets"], return_aux=True)
    np.testing.assert_allclose(m4["ce_sum"], _ce64(logits, batch["targets"], batch["loss_mask"]), rtol=1e-6)
    mtp_targets, mtp_mask = mtp_targets_and_mask(batch)
    np.testing.assert_allclose(m4["mtp_loss_sum"], _ce64(aux["mtp_logits"], mtp_targets, mtp_mask), rtol=1e-6)
    hits = (np.asarray(aux["mtp_logits"]).argmax(-1) == np.asarray(mtp_targets)) * np.asarray(mtp_mask)
    assert float(m4["mtp_correct"]) == hits.sum()


def test_chunked_loss_holds_one_slice_of_logits():
    """At a 16k vocabulary the fp32 logits are most of the step's temporaries; 8 slices cut them to about 1/8."""
    cfg = load_config("tiny", vocab_size=16384, hidden_size=32, num_layers=1, layer_pattern="A", num_heads=2,
                      num_kv_heads=1, head_dim=16, num_experts=0, intermediate_size=32, mtp_num_layers=0)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((B, 256), v.dtype) for k, v in _batch(97).items()}
    temps = {}
    for chunks in (1, 8):
        tcfg = load_train_config(None, {"batch_size": B, "seq_len": 256, "loss_chunks": chunks})
        compiled = jax.jit(make_grad_fn(cfg, tcfg)).lower(params, batch).compile()
        temps[chunks] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = B * 256 * cfg.vocab_size * 4
    assert temps[1] > logits_bytes  # the unchunked step holds at least one full fp32 logits tensor
    assert temps[8] < temps[1] / 3 and temps[8] < logits_bytes / 2, (temps, logits_bytes)


def test_head_loss_sums_and_config_reject_a_chunk_count_that_does_not_divide_the_row():
    h = jnp.ones((1, 6, 4))
    with pytest.raises(ValueError, match="loss_chunks=4"):
        head_loss_sums(lambda x: x, h, jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6)), 4)
    with pytest.raises(ConfigError, match="loss_chunks"):
        load_train_config(None, {"seq_len": 12, "loss_chunks": 5})
