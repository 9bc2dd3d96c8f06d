"""Attention-sink share: read through the model's own attention probabilities (no model edits)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.attention_sink import attention_probs, attention_sink_share
from qwen35_jax import init_params, load_config


def test_uniform_attention_gives_the_harmonic_share():
    cfg = load_config("tiny", vocab_size=37, hidden_size=16, num_layers=4, layer_pattern="FA", num_heads=2,
                      num_kv_heads=1, head_dim=8, gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8,
                      gdn_value_dim=8, num_experts=0, intermediate_size=32, gdn_chunk_size=8)
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))  # random weights: no init compile
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    # zero queries -> zero logits -> uniform attention over each query's document prefix
    for block in ("block_0", "block_1"):  # softmax (F) and gated attention (A): the interceptor finds both
        q_proj = params["layers"][block]["mixer"]["q_proj"]
        q_proj["kernel"] = q_proj["kernel"] * 0
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    seg = np.array([[1] * 6 + [2] * 8 + [0] * 2, [1] * 16])
    probs = attention_probs(cfg, params, tokens, segment_ids=seg)
    assert len(probs) == 4 and probs[0].shape == (2, cfg.num_heads, 16, 16)
    out = attention_sink_share(cfg, params, tokens, segment_ids=seg)
    doc_shares = [1 / (t + 1) for n in (6, 8, 16) for t in range(1, n)]  # query t of a document sees t + 1 keys
    np.testing.assert_allclose(out["per_layer"], [np.mean(doc_shares)] * 4, rtol=1e-5)
