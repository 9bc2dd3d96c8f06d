"""The vision tower in Hugging Face checkpoints: `model.visual.*` tensors and the `vision_config` block.

Registered with `qwen35_jax.hf` as an extension (`hf.register_extension`), so `hf.load` / `hf.save` handle
vision-language checkpoints (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`) through the
same tensor-by-tensor spec walk as the text tower.
"""

from __future__ import annotations

import numpy as np

from qwen35_jax.vision_config import VisionConfig

PREFIX = "model.visual."
VL_EXPORT = {"qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration", "qwen3_5_vision"),
             "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_vision")}
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def config_from_hf(d: dict, tensor_names) -> dict:
    """ModelConfig overrides: {"vision": VisionConfig} when the checkpoint holds `model.visual.*` tensors."""
    v = d.get("vision_config")
    if not v or not any(n.startswith(PREFIX) for n in tensor_names):
        return {"vision": None}
    rope = v.get("rope_parameters") or {}
    text_hidden = (d.get("text_config") or {}).get("hidden_size")
    out = v.get("out_hidden_size", text_hidden)
    kw = dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
              num_heads=v["num_heads"], in_channels=v.get("in_channels", 3), patch_size=v.get("patch_size", 16),
              temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
              out_hidden_size=0 if out == text_hidden else out,
              num_position_embeddings=v.get("num_position_embeddings", 2304),
              rope_theta=float(rope.get("rope_theta", 10000.0)))
    for k in TOKEN_KEYS:
        if d.get(k) is not None:
            kw[k] = int(d[k])
    return {"vision": VisionConfig(**kw)}


def config_to_hf(cfg, text: dict) -> dict:
    """The exported config.json: the text config alone, or (with a tower) the VL wrapper around it."""
    v = cfg.vision
    if v is None:
        return text
    model_type, arch, vision_type = VL_EXPORT[cfg.family]
    text = {k: val for k, val in text.items() if k not in ("architectures", "tie_word_embeddings")}
    vision = dict(model_type=vision_type, depth=v.depth, hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
                  patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, out_hidden_size=v.out_hidden_size or cfg.hidden_size,
                  num_position_embeddings=v.num_position_embeddings, hidden_act="gelu_pytorch_tanh",
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    return {"architectures": [arch], "model_type": model_type, "text_config": text, "vision_config": vision,
            "tie_word_embeddings": cfg.tie_word_embeddings, "dtype": text.get("dtype"),
            **{k: getattr(v, k) for k in TOKEN_KEYS}}


def tensor_specs(cfg) -> dict:
    """Spec per `model.visual.*` tensor (empty without a tower)."""
    from qwen35_jax.hf import T, _leaf

    v = cfg.vision
    if v is None:
        return {}
    D, F, P = v.hidden_size, v.intermediate_size, v.patch_dim
    M, out = v.spatial_merge_size ** 2 * D, v.out_hidden_size or cfg.hidden_size
    conv = (D, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    vis = ("visual",)
    specs = {
        # Conv3d with kernel = stride = the patch is a matmul on the flattened patch.
        PREFIX + "patch_embed.proj.weight": _leaf(vis + ("patch_embed", "kernel"), to_ours=lambda a: a.reshape(D, P).T,
                                                  to_hf=lambda a: np.ascontiguousarray(a.T).reshape(conv), shape=conv),
        PREFIX + "patch_embed.proj.bias": _leaf(vis + ("patch_embed", "bias"), shape=(D,)),
        PREFIX + "pos_embed.weight": _leaf(vis + ("pos_embed",), shape=(v.num_position_embeddings, D)),
    }

    def linear(name, path, g, n_out, n_in):
        specs[name + ".weight"] = _leaf(path + ("kernel",), g, (), T, T, (n_out, n_in))
        specs[name + ".bias"] = _leaf(path + ("bias",), g, shape=(n_out,))

    def norm(name, path, g, n):
        specs[name + ".weight"] = _leaf(path + ("scale",), g, shape=(n,))
        specs[name + ".bias"] = _leaf(path + ("bias",), g, shape=(n,))

    for i in range(v.depth):
        pre, blk = f"{PREFIX}blocks.{i}.", vis + ("blocks",)
        norm(pre + "norm1", blk + ("norm1",), i, D)
        norm(pre + "norm2", blk + ("norm2",), i, D)
        linear(pre + "attn.qkv", blk + ("qkv",), i, 3 * D, D)
        linear(pre + "attn.proj", blk + ("proj",), i, D, D)
        linear(pre + "mlp.linear_fc1", blk + ("fc1",), i, F, D)
        linear(pre + "mlp.linear_fc2", blk + ("fc2",), i, D, F)
    norm(PREFIX + "merger.norm", vis + ("merger", "norm"), None, D)
    linear(PREFIX + "merger.linear_fc1", vis + ("merger", "fc1"), None, M, M)
    linear(PREFIX + "merger.linear_fc2", vis + ("merger", "fc2"), None, out, M)
    return specs
