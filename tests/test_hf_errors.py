"""Bad checkpoints give errors that name the tensor and the shapes; vision-language checkpoints load their text tower."""

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qwen35_jax import forward, hf
from tests.hf_fixtures import hf_logits, hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = hf_model("qwen3_5_moe")
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


def rewrite(src, dst, edit):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.2.linear_attn.A_log"
    bad = rewrite(checkpoint, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.2\.linear_attn\.A_log'.*\(4,\)"):
        hf.load(bad)


def test_misshaped_tensor_names_both_shapes(checkpoint, tmp_path):
    name = "model.layers.0.linear_attn.out_proj.weight"

    def edit(t):
        t[name] = t[name][:, :-1].copy()

    bad = rewrite(checkpoint, tmp_path / "bad", edit)
    with pytest.raises(hf.CheckpointError, match=r"out_proj\.weight' has shape \(64, 47\), config expects \(64, 48\)"):
        hf.load(bad)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    bad = rewrite(checkpoint, tmp_path / "bad", lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3)}))
    with pytest.raises(hf.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        hf.load(bad)


def test_partial_mtp_head_is_an_error(checkpoint, tmp_path):
    path = rewrite(checkpoint, tmp_path / "mtp", lambda t: t.update({"mtp.fc.weight": np.zeros((64, 128))}))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'mtp\."):
        hf.load(path)


def test_corrupt_safetensors_file(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        hf.load(bad)


def test_unknown_model_type(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match="model_type 'llama'"):
        hf.load(bad)


def test_vision_language_checkpoint_text_tower(tmp_path):
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from tests.hf_fixtures import hf_config, randomize_

    text = hf_config("qwen3_5_dense_untied").to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    randomize_(model)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 90, (1, 40))
    ref = hf_logits(model, tokens)
    ours = np.asarray(forward(cfg, params, tokens))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4


def test_fused_expert_layout_loads(checkpoint, tmp_path):
    cfg, params = hf.load(checkpoint)
    hf.save(cfg, params, tmp_path, expert_layout="fused")
    with safe_open(tmp_path / "model.safetensors", "numpy") as fh:
        assert fh.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 48, 64]
    _, params2 = hf.load(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def with_config(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
REFUSED = [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("attention_dropout", 0.1, "attention_dropout=0.1"),
    ("attn_output_gate", False, "attn_output_gate=False"),
    ("mamba_ssm_dtype", "bfloat16", "mamba_ssm_dtype='bfloat16'"),
    ("mtp_use_dedicated_embeddings", True, "mtp_use_dedicated_embeddings=True"),
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("sliding_window", 4096, "sliding_window=4096"),
    ("norm_topk_prob", False, "norm_topk_prob=False"),
    ("mlp_only_layers", [1], r"mlp_only_layers=\[1\]"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2"),
    ("a_future_key", 3, "a_future_key=3"),
    ("rope_parameters", {**ROPE, "rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic'"),
    ("rope_parameters", {**ROPE, "rope_type": "llama3", "factor": 2.0}, "rope_type='llama3'"),
    ("rope_parameters", {**ROPE, "factor": 4.0}, r"rope_parameters\.factor=4\.0"),
    ("rope_parameters", {**ROPE, "short_factor": [1.0]}, r"rope_parameters\.short_factor"),
    ("rope_parameters", {**ROPE, "mrope_interleaved": False}, "mrope_interleaved=False"),
]


@pytest.mark.parametrize("key, value, message", REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
def test_config_fields_that_change_the_computation_are_refused(checkpoint, tmp_path, key, value, message):
    bad = with_config(checkpoint, tmp_path / "bad", lambda c: c.update({key: value}))
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load(bad)


def test_vision_language_wrapper_key_refused():
    text = json.loads(json.dumps(hf_model("qwen3_5_dense_untied").config.to_dict()))
    d = {"model_type": "qwen3_5", "text_config": text, "vision_config": {}, "spatial_merge_override": 3}
    with pytest.raises(hf.CheckpointError, match="spatial_merge_override=3"):
        hf.config_from_hf(d)


def test_every_transformers_config_field_is_classified():
    """A field transformers adds in a later version must be decided here: implemented, harmless or refused."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    from qwen35_jax.hf import config as hfc

    for cls in (Qwen3_5TextConfig, Qwen3_5MoeTextConfig, Qwen3NextConfig):
        for key in cls().to_dict():
            assert key in hfc.HARMLESS | hfc.DRIVEN | set(hfc.PINNED), (cls.__name__, key)


def test_harmless_and_released_keys_load(checkpoint, tmp_path):
    extra = {"output_router_logits": True, "use_cache": False, "attn_output_gate": True, "mamba_ssm_dtype": "float32",
             "mtp_use_dedicated_embeddings": False, "full_attention_interval": 4, "torch_dtype": "bfloat16"}
    ok = with_config(checkpoint, tmp_path / "ok", lambda c: c.update(extra))
    cfg, _ = hf.load(ok)
    assert cfg == hf.load(checkpoint)[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "jnp.bfloat16", "np.float32", "jnp.dtype"])
def test_dtype_accepts_names_and_dtypes(checkpoint, dtype, tmp_path):
    import jax.numpy as jnp

    value = {"bfloat16": "bfloat16", "jnp.bfloat16": jnp.bfloat16, "np.float32": np.float32,
             "jnp.dtype": jnp.dtype("bfloat16")}[dtype]
    cfg, params = hf.load(checkpoint, dtype=value, compute_dtype=value)
    want = "float32" if dtype == "np.float32" else "bfloat16"
    assert cfg.param_dtype == want and cfg.dtype == want
    assert params["norm"]["scale"].dtype == jnp.dtype(want)
    hf.save(cfg, params, tmp_path, dtype=value)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == want
    with pytest.raises(hf.CheckpointError, match="dtype 'int8'"):
        hf.load(checkpoint, dtype="int8")


def test_init_from_refuses_a_different_model_naming_every_field(checkpoint):
    from qwen35_jax.train.data import load_init_params

    cfg, params = hf.load(checkpoint)
    run = cfg.replace(rope_theta=1e6, rms_norm_eps=1e-5, name="run", gdn_impl="recurrent")
    shapes = jax.eval_shape(lambda: params)
    with pytest.raises(hf.CheckpointError) as e:
        load_init_params(checkpoint, run, shapes, jax.tree.map(lambda _: None, shapes))
    msg = str(e.value)
    assert "rope_theta: 1000000.0 vs 10000.0" in msg and "rms_norm_eps: 1e-05 vs 1e-06" in msg
    assert "gdn_impl" not in msg and "name" not in msg  # runtime choices are not the model
    tied = hf.load(checkpoint)[0].replace(tie_word_embeddings=True)
    assert hf.config_mismatch(tied, cfg) == ["tie_word_embeddings: True vs False"]
