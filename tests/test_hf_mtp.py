"""The MTP head checked independently: a reference built from transformers' own decoder-layer, norm and embedding
modules (tests/hf_fixtures.MTPReference) against `forward(..., mtp_tokens=...)`, dense and MoE."""

import numpy as np
import pytest

from qwen35_jax import forward, hf
from tests.hf_fixtures import MTPReference, hf_model, write_release


@pytest.mark.parametrize("family", ["qwen3_5_dense_untied", "qwen3_5_moe"])
def test_mtp_matches_reference_built_from_transformers_modules(family, tmp_path):
    model = hf_model(family)
    mtp = MTPReference(model, seed=3)
    write_release(model, mtp, tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))
    nxt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 30))
    ref = mtp(tokens, nxt)
    _, aux = forward(cfg, params, tokens, mtp_tokens=nxt, return_aux=True)
    ours = np.asarray(aux["mtp_logits"])
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4
    # A wrong wiring (hidden and embedding swapped) is far off: the comparison can fail.
    swapped = MTPReference(model, seed=3)
    swapped.pre_fc_norm_embedding, swapped.pre_fc_norm_hidden = mtp.pre_fc_norm_hidden, mtp.pre_fc_norm_embedding
    assert np.max(np.abs(ours - swapped(tokens, nxt))) / np.max(np.abs(ref)) > 1e-2


def test_acceptance_counts_equal_a_direct_loop():
    """mtp_acceptance.measure (draft position 1) against a loop over forward(..., mtp_tokens=...) outputs, with two
    documents per row (a draft whose target crosses a document boundary is not counted)."""
    import jax

    from qwen35_jax import init_params, load_config, mtp_acceptance

    cfg = load_config("tiny", vocab_size=13, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16,
                      gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8, gdn_value_dim=8, num_experts=0,
                      intermediate_size=40, mtp_num_layers=1, family="qwen3_5")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20))
    seg = np.ones((2, 20), np.int32)
    seg[0, 12:] = 2
    pos = np.concatenate([np.arange(12), np.arange(8)])[None].repeat(2, 0)
    pos[1] = np.arange(20)
    rows = mtp_acceptance.measure(cfg, params, [{"tokens": tokens, "segment_ids": seg, "positions": pos}], depth=2)
    logits, aux = forward(cfg, params, tokens, segment_ids=seg, positions=pos, return_aux=True,
                          mtp_tokens=np.concatenate([tokens[:, 1:], np.zeros((2, 1), int)], 1))
    main, draft = np.argmax(np.asarray(logits), -1), np.argmax(np.asarray(aux["mtp_logits"]), -1)
    n = agree = n_c = control = 0
    for b in range(2):
        for t in range(20):
            if t + 2 < 20 and seg[b, t + 2] == seg[b, t]:
                n += 1
                agree += draft[b, t] == main[b, t + 1]
            if t + 3 < 20 and seg[b, t + 3] == seg[b, t] and main[b, t + 2] != main[b, t + 1]:
                n_c += 1
                control += draft[b, t] == main[b, t + 2]
    assert rows[0]["positions"] == n == 2 * 18 - 2
    assert rows[0]["agree"] == agree / n and rows[0]["prefix"] == agree / n
    assert rows[0]["control"] == control / n_c
    assert rows[1]["positions"] == 2 * 17 - 3 and rows[1]["prefix"] <= rows[0]["prefix"]
