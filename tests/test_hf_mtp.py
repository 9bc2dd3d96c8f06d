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
