"""Cached decoding (KV cache, GDN conv window and recurrent state) reproduces the full forward."""

import jax
import numpy as np
import pytest

from qwen35_jax import forward, init_params, load_config
from qwen35_jax.model import forward_cached, init_cache


def cfg_for(pattern):
    return load_config("tiny", vocab_size=53, hidden_size=32, num_layers=4, layer_pattern=pattern, num_heads=2,
                       num_kv_heads=1, head_dim=16, gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8,
                       gdn_value_dim=8, num_experts=4, experts_per_token=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, gdn_chunk_size=16)


@pytest.mark.parametrize("pattern", ["GGGA", "GGGG"], ids=["hybrid", "all-gdn"])
@pytest.mark.parametrize("prompt_len", [15, 17, 33])  # cross chunk boundaries (chunk 16)
def test_token_by_token_decode_matches_full_forward(pattern, prompt_len):
    cfg = cfg_for(pattern)
    params = init_params(cfg, jax.random.key(0))
    steps = 52
    tokens = np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, (2, prompt_len + steps))
    full = np.asarray(forward(cfg, params, tokens))
    cache = init_cache(cfg, 2, prompt_len + steps)
    logits, _, cache = forward_cached(cfg, params, tokens[:, :prompt_len], cache)
    np.testing.assert_allclose(logits, full[:, :prompt_len], rtol=1e-4, atol=1e-4 * np.abs(full).max())
    step = jax.jit(lambda p, t, c: forward_cached(cfg, p, t, c))
    for t in range(prompt_len, prompt_len + steps):
        logits, _, cache = step(params, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("remat", [{}, {"remat": "full", "remat_scope": "sublayer"}], ids=["plain", "remat-sublayer"])
def test_multi_token_continuation_on_cache(remat):
    cfg = cfg_for("GGGA").replace(**remat)  # a training config's remat leaves decoding as it is
    params = init_params(cfg, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 60))
    full = np.asarray(forward(cfg, params, tokens))
    cache = init_cache(cfg, 1, 60)
    out = []
    for a, b in [(0, 20), (20, 23), (23, 24), (24, 60)]:  # prefill, 3 tokens, 1 token, a long chunked block
        logits, _, cache = forward_cached(cfg, params, tokens[:, a:b], cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, 1), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
