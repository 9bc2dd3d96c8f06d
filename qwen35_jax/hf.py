"""Hugging Face checkpoints: `load(path) -> (cfg, params)` and `save(cfg, params, path)`.

Reads `config.json` plus safetensors (one file or a sharded index) of the families `qwen3_5`, `qwen3_5_text`,
`qwen3_5_moe`, `qwen3_5_moe_text` (vision-language checkpoints contribute their text tower under
`model.language_model.`) and `qwen3_next` (fused `in_proj_qkvz` / `in_proj_ba`, per-expert weights). Tensors are read
one at a time into preallocated arrays, so a sharded checkpoint never needs two copies in memory. Every expected
tensor is described once (`tensor_specs`) with its shape and the conversion in both directions; load and save both
walk that description, which is what makes the round trip exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen35_jax.config import ModelConfig, from_dict
from qwen35_jax.model import init_params, layer_period

TEXT_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next"}
VL_TYPES = {"qwen3_5": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe"}
EXPORT = {
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
    "qwen3_next": ("qwen3_next", "Qwen3NextForCausalLM"),
}
IGNORED_PREFIXES = ("model.visual.",)
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float64": np.float64}


# Modules that add a group of tensors and config keys (qwen35_jax/hf_vision.py: `model.visual.*`). Each provides
# config_from_hf(config_dict, tensor_names) -> ModelConfig overrides, config_to_hf(cfg, exported_dict) -> dict,
# tensor_specs(cfg) -> {name: Spec}.
EXTENSIONS: list = []


def register_extension(ext) -> None:
    if ext not in EXTENSIONS:
        EXTENSIONS.append(ext)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the tensor and the shapes."""


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(d: dict, *, dtype: str = "float32", compute_dtype: str | None = None) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type in VL_TYPES:
        text = dict(d.get("text_config") or {})
        family = VL_TYPES[model_type]
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    elif model_type in TEXT_TYPES:
        text, family = d, TEXT_TYPES[model_type]
        tie = d.get("tie_word_embeddings", False)
    else:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not one of "
                              f"{sorted(set(TEXT_TYPES) | set(VL_TYPES))}")
    rope = text.get("rope_parameters") or {}
    n = text["num_hidden_layers"]
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % text.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(n)]
    num_experts = 0 if family == "qwen3_5" else text.get("num_experts", 0)
    mlp_only = []
    if family == "qwen3_next" and num_experts:
        step = text.get("decoder_sparse_step", 1)
        mlp_only = [i for i in range(n) if i in (text.get("mlp_only_layers") or []) or (i + 1) % step != 0]
    kw = dict(
        name=d.get("_name_or_path") or model_type, family=family, vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"], num_layers=n, layer_pattern=tuple(layer_types), mlp_only_layers=mlp_only,
        num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        rotary_fraction=rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        mrope_section=tuple(rope.get("mrope_section", (11, 11, 10))),
        gdn_num_key_heads=text["linear_num_key_heads"], gdn_num_value_heads=text["linear_num_value_heads"],
        gdn_key_dim=text["linear_key_head_dim"], gdn_value_dim=text["linear_value_head_dim"],
        gdn_conv_kernel=text.get("linear_conv_kernel_dim", 4),
        intermediate_size=text.get("intermediate_size") or 0, num_experts=num_experts,
        experts_per_token=text.get("num_experts_per_tok", 1) if num_experts else 1,
        moe_intermediate_size=text.get("moe_intermediate_size", 0) if num_experts else 0,
        shared_expert_intermediate_size=text.get("shared_expert_intermediate_size", 0) if num_experts else 0,
        norm_topk_prob=bool(text.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.001)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(tie),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        initializer_range=float(text.get("initializer_range", 0.02)),
        mtp_num_layers=int(text.get("mtp_num_hidden_layers", 0) or 0),
        param_dtype=dtype, dtype=compute_dtype or dtype,
        bos_token_id=_first(text.get("bos_token_id", d.get("bos_token_id"))),
        eos_token_id=_first(text.get("eos_token_id", d.get("eos_token_id"))),
        pad_token_id=_first(text.get("pad_token_id", d.get("pad_token_id"))),
    )
    return from_dict(kw, source="config.json")


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


def config_to_hf(cfg: ModelConfig) -> dict:
    bad = [m for m in cfg.layer_pattern if m not in ("gdn", "attn")]
    if bad or cfg.attn_output_gate != "elementwise" or cfg.sliding_window:
        raise CheckpointError(f"config {cfg.name!r} is an ablation variant (mixers {sorted(set(bad))}, gate "
                              f"{cfg.attn_output_gate!r}, window {cfg.sliding_window}); Qwen3.5 checkpoints cannot "
                              "express it")
    model_type, arch = EXPORT[cfg.family]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction}
    if cfg.family != "qwen3_next":
        rope.update(mrope_section=list(cfg.mrope_section), mrope_interleaved=True)
    d = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "layer_types": ["full_attention" if m == "attn" else "linear_attention" for m in cfg.layer_pattern],
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_parameters": rope, "linear_num_key_heads": cfg.gdn_num_key_heads,
        "linear_num_value_heads": cfg.gdn_num_value_heads, "linear_key_head_dim": cfg.gdn_key_dim,
        "linear_value_head_dim": cfg.gdn_value_dim, "linear_conv_kernel_dim": cfg.gdn_conv_kernel,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "attention_bias": False, "dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if cfg.intermediate_size:
        d["intermediate_size"] = cfg.intermediate_size
    if cfg.is_moe:
        d.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)
        if cfg.family == "qwen3_next":
            d.update(norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                     mlp_only_layers=list(cfg.mlp_only_layers))
    if cfg.mtp_num_layers:
        d["mtp_num_hidden_layers"] = cfg.mtp_num_layers
    return d


# ---------------------------------------------------------------------------------------------------------------
# The tensor description shared by load and save


@dataclass
class Spec:
    """One Hugging Face tensor: its shape, how to write it into our params and how to read it back."""

    shape: tuple
    put: Callable  # (buffers, array) -> None
    get: Callable  # (params) -> array


def _leaf(path, group=None, index=(), to_ours=lambda a: a, to_hf=lambda a: a, shape=None):
    """A Spec for a tensor stored at params[path][group][index] after `to_ours`."""

    def put(buffers, a):
        dst = buffers[path]
        dst[((group,) if group is not None else ()) + index] = to_ours(a)

    def get(params):
        src = _get(params, path)
        src = src[((group,) if group is not None else ()) + index]
        return to_hf(np.asarray(src))

    return Spec(shape, put, get)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


T = np.transpose


def tensor_specs(cfg: ModelConfig, prefix: str = "model.", expert_layout: str = "fused") -> dict[str, Spec]:
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = {f"{prefix}embed_tokens.weight": _leaf(("embed_tokens", "embedding"), shape=(V, D)),
             f"{prefix}norm.weight": _leaf(("norm", "scale"), shape=(D,))}
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = _leaf(("lm_head",), to_ours=T, to_hf=T, shape=(V, D))
    period = layer_period(cfg.layer_kinds)
    for i, (mixer, ffn) in enumerate(cfg.layer_kinds):
        _block_specs(cfg, specs, f"{prefix}layers.{i}.", ("layers", f"block_{i % period}"), i // period, mixer, ffn,
                     expert_layout)
    if cfg.mtp_num_layers:
        m = ("mtp",)
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            specs[f"mtp.{name}.weight"] = _leaf(m + (name, "scale"), shape=(D,))
        specs["mtp.fc.weight"] = _leaf(m + ("fc", "kernel"), None, (), T, T, (D, 2 * D))
        _block_specs(cfg, specs, "mtp.layers.0.", m + ("layers_0",), None, "attn", "moe" if cfg.is_moe else "mlp",
                     expert_layout)
    for ext in EXTENSIONS:
        specs.update(ext.tensor_specs(cfg))
    return specs


def _block_specs(cfg, specs, pre, blk, g, mixer, ffn, expert_layout):
    """One decoder layer at params[blk] (stacked layers: index g of the leading axis; g=None: not stacked)."""
    D = cfg.hidden_size

    def lin(name, path, out, inp):
        specs[pre + name] = _leaf(blk + path, g, (), T, T, (out, inp))

    def vec(name, path, n):
        specs[pre + name] = _leaf(blk + path, g, shape=(n,))

    vec("input_layernorm.weight", ("input_norm", "scale"), D)
    vec("post_attention_layernorm.weight", ("post_norm", "scale"), D)
    if mixer == "attn":
        H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        m = ("mixer",)
        lin("self_attn.q_proj.weight", m + ("q_proj", "kernel"), 2 * H * K, D)
        lin("self_attn.k_proj.weight", m + ("k_proj", "kernel"), G * K, D)
        lin("self_attn.v_proj.weight", m + ("v_proj", "kernel"), G * K, D)
        lin("self_attn.o_proj.weight", m + ("o_proj", "kernel"), D, H * K)
        vec("self_attn.q_norm.weight", m + ("q_norm", "scale"), K)
        vec("self_attn.k_norm.weight", m + ("k_norm", "scale"), K)
    else:
        _gdn_specs(cfg, specs, pre + "linear_attn.", blk + ("mixer",), g)
    if ffn == "mlp":
        for name, out, inp in (("gate_proj", cfg.intermediate_size, D), ("up_proj", cfg.intermediate_size, D),
                               ("down_proj", D, cfg.intermediate_size)):
            lin(f"mlp.{name}.weight", ("ffn", name, "kernel"), out, inp)
    else:
        _moe_specs(cfg, specs, pre + "mlp.", blk + ("ffn",), g, expert_layout)


def _gdn_specs(cfg, specs, pre, m, g):
    gi = (g,) if g is not None else ()
    D = cfg.hidden_size
    Hk, Hv, dk, dv, C = (cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim,
                         cfg.gdn_conv_dim)
    specs[pre + "conv1d.weight"] = _leaf(m + ("conv1d",), g, to_ours=lambda a: a[:, 0, :].T,
                                         to_hf=lambda a: a.T[:, None, :], shape=(C, 1, cfg.gdn_conv_kernel))
    for name, n in (("dt_bias", Hv), ("A_log", Hv)):
        specs[pre + name] = _leaf(m + (name,), g, shape=(n,))
    specs[pre + "norm.weight"] = _leaf(m + ("norm", "scale"), g, shape=(dv,))
    specs[pre + "out_proj.weight"] = _leaf(m + ("out_proj", "kernel"), g, (), T, T, (D, Hv * dv))
    if cfg.family != "qwen3_next":
        for name, out in (("in_proj_qkv", C), ("in_proj_z", Hv * dv), ("in_proj_b", Hv), ("in_proj_a", Hv)):
            specs[pre + f"{name}.weight"] = _leaf(m + (name, "kernel"), g, (), T, T, (out, D))
        return
    # Qwen3-Next fuses per key head: qkvz rows [Hk, (q dk | k dk | v r*dv | z r*dv)], ba rows [Hk, (b r | a r)].
    r = Hv // Hk

    def put_qkvz(buffers, a):
        a = a.reshape(Hk, 2 * dk + 2 * r * dv, D)
        q, k = a[:, :dk].reshape(-1, D), a[:, dk:2 * dk].reshape(-1, D)
        v, z = a[:, 2 * dk:2 * dk + r * dv].reshape(-1, D), a[:, 2 * dk + r * dv:].reshape(-1, D)
        buffers[m + ("in_proj_qkv", "kernel")][gi] = np.concatenate([q, k, v]).T
        buffers[m + ("in_proj_z", "kernel")][gi] = z.T

    def get_qkvz(params):
        qkv = np.asarray(_get(params, m + ("in_proj_qkv", "kernel"))[gi]).T
        z = np.asarray(_get(params, m + ("in_proj_z", "kernel"))[gi]).T
        q, k, v = qkv[:Hk * dk], qkv[Hk * dk:2 * Hk * dk], qkv[2 * Hk * dk:]
        parts = [q.reshape(Hk, dk, D), k.reshape(Hk, dk, D), v.reshape(Hk, r * dv, D), z.reshape(Hk, r * dv, D)]
        return np.concatenate(parts, axis=1).reshape(-1, D)

    def put_ba(buffers, a):
        a = a.reshape(Hk, 2 * r, D)
        buffers[m + ("in_proj_b", "kernel")][gi] = a[:, :r].reshape(Hv, D).T
        buffers[m + ("in_proj_a", "kernel")][gi] = a[:, r:].reshape(Hv, D).T

    def get_ba(params):
        b = np.asarray(_get(params, m + ("in_proj_b", "kernel"))[gi]).T.reshape(Hk, r, D)
        a = np.asarray(_get(params, m + ("in_proj_a", "kernel"))[gi]).T.reshape(Hk, r, D)
        return np.concatenate([b, a], axis=1).reshape(-1, D)

    specs[pre + "in_proj_qkvz.weight"] = Spec((2 * Hk * dk + 2 * Hv * dv, D), put_qkvz, get_qkvz)
    specs[pre + "in_proj_ba.weight"] = Spec((2 * Hv, D), put_ba, get_ba)


def _moe_specs(cfg, specs, pre, f, g, expert_layout):
    D, E, F, S = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    specs[pre + "gate.weight"] = _leaf(f + ("gate",), g, (), T, T, (E, D))
    if S:
        for name, out, inp in (("gate_proj", S, D), ("up_proj", S, D), ("down_proj", D, S)):
            specs[pre + f"shared_expert.{name}.weight"] = _leaf(f + ("shared_expert", name, "kernel"), g, (), T, T,
                                                                (out, inp))
        specs[pre + "shared_expert_gate.weight"] = _leaf(f + ("shared_expert_gate",), g, (), T, T, (1, D))
    swap = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
    if expert_layout == "fused":
        specs[pre + "experts.gate_up_proj"] = _leaf(f + ("gate_up_proj",), g, (), swap, swap, (E, 2 * F, D))
        specs[pre + "experts.down_proj"] = _leaf(f + ("down_proj",), g, (), swap, swap, (E, D, F))
        return
    for e in range(E):
        specs[pre + f"experts.{e}.gate_proj.weight"] = _leaf(f + ("gate_up_proj",), g, (e, slice(None), slice(0, F)),
                                                             T, T, (F, D))
        specs[pre + f"experts.{e}.up_proj.weight"] = _leaf(f + ("gate_up_proj",), g, (e, slice(None), slice(F, None)),
                                                           T, T, (F, D))
        specs[pre + f"experts.{e}.down_proj.weight"] = _leaf(f + ("down_proj",), g, (e,), T, T, (D, F))


# ---------------------------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Tensor-by-tensor access to one safetensors file or a sharded index."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
            for file in files:
                try:
                    with safe_open(file, "numpy") as fh:
                        weight_map.update({k: file.name for k in fh.keys()})
                except Exception as e:  # truncated or corrupt header
                    raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        self.path, self.weight_map = path, weight_map

    def names(self):
        return list(self.weight_map)

    def shape(self, name):
        with safe_open(self.path / self.weight_map[name], "numpy") as fh:
            return tuple(fh.get_slice(name).get_shape())

    def read(self, name):
        file = self.path / self.weight_map[name]
        if not file.exists():
            raise CheckpointError(f"{file}: shard named by the index for tensor {name!r} is missing")
        try:
            with safe_open(file, "numpy") as fh:
                return fh.get_tensor(name)
        except Exception as e:  # safetensors raises several types for truncated or corrupt files
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def _prefix_and_layout(cfg_dict: dict, names) -> tuple[str, str]:
    prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in names) else "model."
    layout = "per_expert" if any(re.search(r"\.experts\.\d+\.", n) for n in names) else "fused"
    return prefix, layout


def load(path, dtype: str = "float32", compute_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face checkpoint folder; params as jax arrays of `dtype`, computing in
    `compute_dtype` (default: `dtype`)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    cfg_dict = json.loads(cfg_file.read_text())
    cfg = config_from_hf(cfg_dict, dtype=dtype, compute_dtype=compute_dtype)
    reader = _Reader(path)
    names = reader.names()
    prefix, layout = _prefix_and_layout(cfg_dict, names)
    has_mtp = any(n.startswith("mtp.") for n in names)
    if has_mtp != bool(cfg.mtp_num_layers):  # trust the tensors: stripped checkpoints drop the MTP head
        cfg = cfg.replace(mtp_num_layers=1 if has_mtp else 0)
    for ext in EXTENSIONS:
        cfg = cfg.replace(**ext.config_from_hf(cfg_dict, names))
    specs = tensor_specs(cfg, prefix, layout)
    missing = [n for n in specs if n not in reader.weight_map]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} (expected shape {specs[missing[0]].shape})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [n for n in names if n not in specs and not n.startswith(IGNORED_PREFIXES)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} with shape {reader.shape(unexpected[0])}"
                              f" for config {cfg.family} ({len(unexpected)} unexpected in all)")
    np_dtype = NP_DTYPES[dtype]
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    buffers = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        buffers[tuple(k.key for k in p)] = np.zeros(leaf.shape, np_dtype)
    for name, spec in specs.items():
        a = reader.read(name)
        if tuple(a.shape) != tuple(spec.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(a.shape)}, config expects "
                                  f"{tuple(spec.shape)}")
        spec.put(buffers, a.astype(np_dtype))
    params = {}
    for key in list(buffers):
        node = params
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jax.numpy.asarray(buffers.pop(key))
    return cfg, params


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save(cfg: ModelConfig, params, path, *, expert_layout: str = "per_expert", dtype: str | None = None,
         max_shard_bytes: int = 5 * 2 ** 30, extra_tensors: dict | None = None) -> None:
    """Writes config.json and safetensors shards (with an index when there are several) that transformers loads.

    `expert_layout`: "per_expert" (`experts.{e}.gate_proj/up_proj/down_proj`, what transformers itself writes) or
    "fused" (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); both load.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = NP_DTYPES[dtype or cfg.param_dtype]
    specs = tensor_specs(cfg, "model.language_model." if cfg.vision is not None else "model.", expert_layout)
    host = jax.tree.map(np.asarray, params)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            current, size = {}, 0

    items = [(n, s.get(host)) for n, s in specs.items()] + list((extra_tensors or {}).items())
    for name, a in items:
        a = np.ascontiguousarray(np.asarray(a).astype(np_dtype))
        if size and size + a.nbytes > max_shard_bytes:
            flush()
        current[name] = a
        size += a.nbytes
    flush()
    config = config_to_hf(cfg)
    for ext in EXTENSIONS:
        config = ext.config_to_hf(cfg, config)
    config["dtype"] = np.dtype(np_dtype).name
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(a.nbytes for a in shard.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


from qwen35_jax import hf_vision  # noqa: E402

register_extension(hf_vision)
