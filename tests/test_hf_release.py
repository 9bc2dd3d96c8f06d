"""Folders in the layouts the releases use: Qwen3.5 release (VL prefix, fused main experts, per-expert MTP experts,
two shards and an index), Qwen3.6 (MTP experts packed too) and FP8 (block-scaled F8_E4M3 with weight_scale_inv)."""

import json

import jax
import numpy as np
import pytest

from qwen35_jax import forward, hf
from qwen35_jax.hf import fp8
from qwen35_jax.hf.safetensors_io import FolderReader
from tests.hf_fixtures import MTPReference, hf_logits, hf_model, write_release

FP32_TOL = 1e-4


def rel(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = hf_model("qwen3_5_moe")
    mtp = MTPReference(model)
    path = tmp_path_factory.mktemp("release")
    tensors = write_release(model, mtp, path)
    return model, mtp, path, tensors


def mtp_logits(cfg, params, tokens):
    nxt = np.roll(tokens, -1, axis=1)
    _, aux = forward(cfg, params, tokens, mtp_tokens=nxt, return_aux=True)
    return np.asarray(aux["mtp_logits"])


def test_release_fixture_is_in_the_release_layout(release):
    _, _, path, tensors = release
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in tensors
    assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in tensors
    assert "lm_head.weight" in tensors and "mtp.fc.weight" in tensors
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_5_moe"


def test_release_loads_and_matches_transformers(release):
    model, mtp, path, _ = release
    cfg, params = hf.load(path)
    assert cfg.mtp_num_layers == 1 and cfg.family == "qwen3_5_moe"
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    assert rel(forward(cfg, params, tokens), hf_logits(model, tokens)) <= FP32_TOL


@pytest.mark.parametrize("layout", ["transformers", "fused", "release", "release_packed"])
def test_mtp_logits_equal_in_every_layout(release, layout, tmp_path):
    _, _, path, _ = release
    cfg, params = hf.load(path)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
    hf.save(cfg, params, tmp_path, layout=layout, max_shard_bytes=200_000)
    names = FolderReader(tmp_path).names()
    assert ("mtp.layers.0.mlp.experts.0.gate_proj.weight" in names) == (layout in ("transformers", "release"))
    assert ("model.language_model.norm.weight" in names) == layout.startswith("release")
    cfg2, params2 = hf.load(tmp_path)
    assert cfg2.replace(name=cfg.name) == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    np.testing.assert_array_equal(mtp_logits(cfg2, params2, tokens), mtp_logits(cfg, params, tokens))


def test_release_round_trip_is_tensor_exact_with_the_same_names(release, tmp_path):
    _, _, path, tensors = release
    cfg, params = hf.load(path)
    hf.save(cfg, params, tmp_path, layout="release", max_shard_bytes=300_000)
    written = FolderReader(tmp_path)
    assert set(written.names()) == set(tensors)
    for name, a in tensors.items():
        np.testing.assert_array_equal(np.asarray(written.array(name)), a, err_msg=name)
    src = json.loads((path / "config.json").read_text())
    dst = json.loads((tmp_path / "config.json").read_text())
    assert dst["model_type"] == src["model_type"] and "text_config" in dst
    assert hf.load(tmp_path)[0].replace(name=cfg.name) == cfg


def test_qwen36_packed_mtp_experts_load(release, tmp_path):
    model, mtp, path, _ = release
    write_release(model, mtp, tmp_path, mtp_experts="fused")
    assert "mtp.layers.0.mlp.experts.gate_up_proj" in FolderReader(tmp_path).names()
    cfg, params = hf.load(tmp_path)
    cfg0, params0 = hf.load(path)
    jax.tree.map(np.testing.assert_array_equal, params, params0)


# ---------------------------------------------------------------------------------------------------------------
# FP8


def not_quantized(name: str, a) -> bool:
    """What the FP8 releases keep in bf16: embeddings, LM head, norms and other vectors, the router, the shared
    expert gate, the GDN decay/step projections (in_proj_a/b) and conv1d."""
    return (a.ndim < 2 or "embed_tokens" in name or name == "lm_head.weight" or name.endswith("mlp.gate.weight")
            or "shared_expert_gate" in name or "in_proj_a." in name or "in_proj_b." in name or "conv1d" in name
            or "norm" in name)


BLOCK = (32, 32)  # the tiny model's 48- and 80-row tensors give ragged edge blocks


def quantize_folder(tensors, config):
    out = {}
    for name, a in tensors.items():
        if not_quantized(name, a):
            out[name] = a.astype("bfloat16") if a.dtype != np.float32 else a.astype(np.float32).astype(
                __import__("ml_dtypes").bfloat16)
            continue
        q, s = fp8.quantize(a, BLOCK)
        out[name], out[name + "_scale_inv"] = q, s
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    return out


@pytest.fixture(scope="module")
def fp8_release(release, tmp_path_factory):
    model, mtp, _, _ = release
    path = tmp_path_factory.mktemp("fp8")
    tensors = write_release(model, mtp, path, transform=quantize_folder)
    return model, mtp, path, tensors


def test_block_dequantize_ragged_edges():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 300, 200)).astype(np.float32) * rng.uniform(0.01, 10, size=(2, 300, 1))
    q, s = fp8.quantize(w, (128, 128))
    assert q.dtype.name == "float8_e4m3fn" and s.shape == (2, 3, 2)
    deq = fp8.dequantize(q, s, (128, 128))
    for i in range(3):
        for j in range(2):  # each element from its own block's scale
            blk = (slice(None), slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            np.testing.assert_array_equal(deq[blk], q[blk].astype(np.float32) * s[:, i:i + 1, j:j + 1])
    amax = np.repeat(np.repeat(s * fp8.FP8_MAX, 128, 1), 128, 2)[:, :300, :200]
    assert np.all(np.abs(deq - w) <= 2 ** -4 * np.abs(w) + amax * 2 ** -9)  # e4m3: 3 mantissa bits
    with pytest.raises(hf.CheckpointError, match=r"scale_inv has shape \(2, 2, 2\)"):
        fp8.dequantize(q, s[:, :2], (128, 128), "w")


def test_fp8_release_loads_dequantized(fp8_release):
    import torch

    model, mtp, path, tensors = fp8_release
    names = FolderReader(path)
    assert names.dtype("model.language_model.layers.0.mlp.experts.gate_up_proj") == "F8_E4M3"
    assert names.dtype("model.language_model.layers.0.mlp.gate.weight") == "BF16"
    assert names.dtype("mtp.layers.0.mlp.experts.3.up_proj.weight") == "F8_E4M3"
    cfg, params = hf.load(path)
    # The reference: transformers' model with every tensor replaced by its dequantized (or bf16) value.
    deq = {n: (fp8.dequantize(a, tensors[n + "_scale_inv"], BLOCK) if a.dtype.name == "float8_e4m3fn"
               else a.astype(np.float32)) for n, a in tensors.items() if not n.endswith("_scale_inv")}
    ref = hf_model("qwen3_5_moe")
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            key = "model.language_model." + name[len("model."):] if name.startswith("model.") else name
            p.copy_(torch.from_numpy(deq[key]))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 40))
    assert rel(forward(cfg, params, tokens), hf_logits(ref, tokens)) <= FP32_TOL
    # The loaded weights are the dequantized ones exactly, and within FP8 rounding of the weights quantized.
    np.testing.assert_array_equal(np.asarray(params["mtp"]["fc"]["kernel"]), deq["mtp.fc.weight"].T)
    w = model.state_dict()["model.layers.0.mlp.experts.down_proj"].numpy()
    got = np.swapaxes(np.asarray(params["layers"]["block_0"]["ffn"]["down_proj"][0]), -1, -2)
    assert np.max(np.abs(got - w)) <= 2 ** -4 * np.max(np.abs(w))


def test_fp8_missing_scale_is_named(fp8_release, tmp_path):
    import shutil

    _, _, path, _ = fp8_release
    shutil.copytree(path, tmp_path / "bad")
    index = json.loads((tmp_path / "bad" / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.1.mlp.shared_expert.up_proj.weight_scale_inv"
    del index["weight_map"][name]
    (tmp_path / "bad" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=r"is F8_E4M3 without its scale tensor .*shared_expert\.up_proj"):
        hf.load(tmp_path / "bad")
