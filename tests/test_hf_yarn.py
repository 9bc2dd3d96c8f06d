"""YaRN rotary scaling read from Hugging Face configs as transformers reads it: logits past the original context
match transformers at 1e-4 (Qwen3.5 with its mRoPE sections, Qwen3-Next), and the scaling survives hf.save."""

import json

import numpy as np
import pytest

from qwen35_jax import forward, hf, load_config
from tests.hf_fixtures import hf_logits, hf_model

ORIGINAL = 32  # the tiny models' "pretraining" context; the tests run 4x past it


def yarn(factor, **extra):
    return {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": factor,
            "original_max_position_embeddings": ORIGINAL, **extra}


CASES = [
    ("qwen3_5_dense_untied", yarn(2.0)),
    ("qwen3_5_dense_untied", yarn(4.0, mrope_section=[2, 1, 1], mrope_interleaved=True)),
    ("qwen3_5_moe", yarn(8.0, beta_fast=16, beta_slow=2, truncate=False)),
    ("qwen3_next", yarn(4.0)),
    ("qwen3_next", yarn(16.0, mscale=1.0, mscale_all_dim=0.5)),
    ("qwen3_next", yarn(3.0, attention_factor=1.3)),
]


@pytest.mark.parametrize("family, rope", CASES, ids=[f"{f}-{r['factor']:g}" for f, r in CASES])
def test_yarn_logits_match_transformers_past_the_original_context(family, rope, tmp_path):
    model = hf_model(family, rope_parameters=rope)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == rope["factor"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4 * ORIGINAL))
    ref = hf_logits(model, tokens)
    ours = np.asarray(forward(cfg, params, tokens))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4
    # The scaling is not a no-op here: plain RoPE on the same weights is far off.
    plain = np.asarray(forward(cfg.replace(rope_scaling=None), params, tokens))
    assert np.max(np.abs(plain - ref)) / np.max(np.abs(ref)) > 1e-3
    # hf.save writes it back; the reloaded config is the same and transformers reads the same scaling.
    hf.save(cfg, params, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "yarn" and saved["factor"] == rope["factor"]
    assert hf.load(tmp_path / "out")[0] == cfg
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(again, tokens), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_yarn_preset_key():
    cfg = load_config("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 4096})
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.beta_fast == 32.0
    assert cfg.replace(name="x").rope_scaling == cfg.rope_scaling
    hash(cfg)  # configs are static jit arguments
    from qwen35_jax.config import ConfigError

    with pytest.raises(ConfigError, match="unknown rope_scaling key 'factr'"):
        load_config("tiny", rope_scaling={"rope_type": "yarn", "factr": 4.0})
    with pytest.raises(ConfigError, match="rope_scaling.rope_type 'linear'"):
        load_config("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0,
                                          "original_max_position_embeddings": 8})
