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
