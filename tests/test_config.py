"""Presets, overrides, validation messages, and the config's parameter counts against the published shapes."""

import jax
import numpy as np
import pytest

from qwen35_jax import ConfigError, init_params, load_config
from qwen35_jax.config import parse_overrides, preset_names

# Text-tower parameter counts recomputed from the released shapes (../shared/docs/architecture.md section 2).
PUBLISHED = {
    "qwen3.5-397b-a17b": (396.35e9, 16.3e9), "qwen3.5-122b-a10b": (122.1e9, None),
    "qwen3.5-35b-a3b": (34.66e9, 2.95e9), "qwen3-next-80b-a3b": (79.67e9, 3.56e9), "qwen3.5-27b": (26.9e9, None),
    "qwen3.5-9b": (8.95e9, None), "qwen3.5-4b": (4.21e9, None), "qwen3.5-2b": (1.88e9, None),
    "qwen3.5-0.8b": (0.75e9, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_released_presets_match_published_counts(name):
    cfg = load_config(name)
    total, active = PUBLISHED[name]
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert counted == cfg.param_counts()["total"]
    assert abs(counted / total - 1) < 0.005
    if active:
        assert abs(cfg.param_counts()["active"] / active - 1) < 0.01


@pytest.mark.parametrize("name", ["tiny", "replica-100m", "replica-1b", "bench-small"])
def test_replica_presets_keep_the_design(name):
    cfg = load_config(name)
    assert cfg.layer_pattern[:4] == ("gdn", "gdn", "gdn", "attn") and cfg.is_moe
    assert cfg.shared_expert_intermediate_size > 0 and cfg.attn_output_gate == "elementwise"
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.param_counts()["total"]


def test_replica_sizes():
    assert 1e6 < load_config("tiny").param_counts()["total"] < 1e7
    assert 0.08e9 < load_config("replica-100m").param_counts()["total"] < 0.13e9
    assert 0.8e9 < load_config("replica-1b").param_counts()["total"] < 1.3e9


def test_overrides_and_patterns():
    cfg = load_config("tiny", num_layers=8, layer_pattern="GA")
    assert cfg.layer_pattern == ("gdn", "attn") * 4
    assert load_config("tiny", **parse_overrides(["hidden_size=64", "rope_theta=1e4"])).hidden_size == 64
    hf_style = load_config("tiny", layer_pattern=["linear_attention", "full_attention"])
    assert hf_style.layer_pattern == ("gdn", "attn", "gdn", "attn")


@pytest.mark.parametrize("overrides, message", [
    ({"hiden_size": 4}, r"unknown key 'hiden_size' \(did you mean 'hidden_size'\?\)"),
    ({"gdn_num_value_heads": 3}, r"gdn_num_value_heads=3 is not a multiple of gdn_num_key_heads=2"),
    ({"num_heads": 3}, r"num_heads=3 is not a multiple of num_kv_heads=2"),
    ({"experts_per_token": 17}, r"experts_per_token=17 must be in \[1, num_experts=16\]"),
    ({"rotary_fraction": 0.3}, r"rotary width .* must be an even integer"),
    ({"layer_pattern": ["gdn", "mamba"]}, r"unknown mixer 'mamba'"),
    ({"layer_pattern": "GXGA"}, r"unknown mixer letter 'X'"),
    ({"layer_pattern": "GGA"}, r"does not divide num_layers=4"),
    ({"hidden_size": "big"}, r"key 'hidden_size' must be an integer, got 'big'"),
    ({"rope_theta": "fast"}, r"key 'rope_theta' must be a number, got 'fast'"),
    ({"gdn_chunk_size": 48}, r"gdn_chunk_size=48 is not a power of two"),
    ({"gdn_impl": "palas"}, r"key 'gdn_impl' must be one of auto, xla, pallas, recurrent, got 'palas' "
                            r"\(did you mean 'pallas'\?\)"),
    ({"moe_impl": "triton"}, r"key 'moe_impl' must be one of auto, xla, pallas, reference, got 'triton'"),
    ({"remat": "some"}, r"key 'remat' must be one of none, full, dots, dots_no_batch"),
    ({"num_heads": 0}, r"num_heads must be positive, got 0"),
    ({"num_kv_heads": 0}, r"num_kv_heads must be positive, got 0"),
    ({"head_dim": 0}, r"head_dim must be positive, got 0"),
    ({"gdn_num_key_heads": 0}, r"gdn_num_key_heads must be positive, got 0"),
    ({"gdn_num_value_heads": 0}, r"gdn_num_value_heads must be positive, got 0"),
    ({"gdn_key_dim": 0}, r"gdn_key_dim must be positive, got 0"),
    ({"gdn_value_dim": 0}, r"gdn_value_dim must be positive, got 0"),
    ({"mlp_only_layers": "all"}, r"key 'mlp_only_layers' must be a list, got 'all'"),
    ({"bos_token_id": "x"}, r"key 'bos_token_id' must be an integer or null, got 'x'"),
    ({"tie_word_embeddings": "yes"}, r"must be true/false"),
    ({"output_init_scale": -0.5}, r"output_init_scale must be >= 0, got -0.5"),
    ({"initializer_range": 0}, r"initializer_range must be positive, got 0"),
])
def test_validation_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("tiny", **overrides)
    assert "\n" not in str(e.value)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"unknown model preset 'tinny' \(did you mean 'tiny'\?\)"):
        load_config("tinny")
    assert "tiny" in preset_names()


def test_flops_per_token_includes_sequence_terms():
    cfg = load_config("qwen3.5-397b-a17b")
    short, long = cfg.flops_per_token(1024), cfg.flops_per_token(32768)
    assert long > short > 6 * cfg.param_counts()["active"]
