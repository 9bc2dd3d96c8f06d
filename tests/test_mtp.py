"""Multi-token prediction head: released `mtp.*` tensors round-trip through hf.py; the head predicts token t+2."""

import jax
import numpy as np
import pytest
from safetensors import safe_open

from qwen35_jax import forward, hf, init_params, load_config


def mtp_cfg(moe: bool, **kw):
    return load_config("tiny", vocab_size=71, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16,
                       gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8, gdn_value_dim=8,
                       num_experts=4 if moe else 0, experts_per_token=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16 if moe else 0, intermediate_size=40, gdn_chunk_size=16,
                       mtp_num_layers=1, tie_word_embeddings=False, family="qwen3_5_moe" if moe else "qwen3_5", **kw)


@pytest.mark.parametrize("moe, layout", [(False, "per_expert"), (True, "per_expert"), (True, "fused")],
                         ids=["dense", "moe-per-expert", "moe-fused"])
def test_mtp_tensors_round_trip(moe, layout, tmp_path):
    cfg = mtp_cfg(moe)
    params = init_params(cfg, jax.random.key(0))
    hf.save(cfg, params, tmp_path, expert_layout=layout)
    with safe_open(tmp_path / "model.safetensors", "numpy") as fh:
        names = set(fh.keys())
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight"} <= names
    assert ("mtp.layers.0.mlp.experts.0.gate_proj.weight" in names) == (moe and layout == "per_expert")
    cfg2, params2 = hf.load(tmp_path)
    assert cfg2.mtp_num_layers == 1
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_transformers_ignores_the_mtp_head_of_our_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.hf_fixtures import hf_logits

    cfg = mtp_cfg(True)
    params = init_params(cfg, jax.random.key(1))
    hf.save(cfg, params, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 20))
    ours = np.asarray(forward(cfg, params, tokens))
    np.testing.assert_allclose(hf_logits(model, tokens), ours, atol=1e-4 * np.abs(ours).max())


def test_mtp_logits_use_next_token_and_are_causal():
    cfg = mtp_cfg(False)
    params = init_params(cfg, jax.random.key(2))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12))
    nxt = np.roll(tokens, -1, axis=1)
    _, aux = forward(cfg, params, tokens, mtp_tokens=nxt, return_aux=True)
    base = np.asarray(aux["mtp_logits"])
    changed = nxt.copy()
    changed[0, 6] = (changed[0, 6] + 1) % cfg.vocab_size  # token 7 enters MTP position 6 and later only
    _, aux2 = forward(cfg, params, tokens, mtp_tokens=changed, return_aux=True)
    out = np.asarray(aux2["mtp_logits"])
    np.testing.assert_allclose(out[0, :6], base[0, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0, 6], base[0, 6])


def test_mtp_router_joins_the_load_balancing_loss():
    """With MTP training on a MoE model, the MTP layer's router statistics are pooled with the main layers' in the
    load-balancing loss and the expert-count metric (one more row)."""
    from qwen35_jax.train.config import load_train_config
    from qwen35_jax.train.losses import load_balancing_loss
    from qwen35_jax.train.step import global_norms, loss_and_metrics, router_metrics

    cfg = mtp_cfg(True)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(12), tokens.shape), "loss_mask": np.ones(tokens.shape, np.float32)}
    tcfg = load_train_config(None, {"mtp_lambda": 0.3, "batch_size": 2, "seq_len": 12})
    norms = global_norms(cfg, tcfg, batch)
    _, metrics = loss_and_metrics(cfg, tcfg, params, batch, norms)
    metrics.update(router_metrics(cfg, metrics, norms))
    _, aux = forward(cfg, params, tokens, mtp_tokens=batch["targets"], return_aux=True)
    main, mtp = aux["router"], aux["mtp_router"]
    pooled = {k: np.concatenate([np.asarray(main[k]), np.asarray(mtp[k])[None]]) for k in main}
    assert metrics["expert_counts"].shape == (cfg.num_layers + 1, cfg.num_experts)
    np.testing.assert_allclose(metrics["router_aux"], load_balancing_loss(pooled, cfg.num_experts), rtol=1e-6)
    assert abs(float(metrics["router_aux"]) - float(load_balancing_loss(main, cfg.num_experts))) > 1e-6
