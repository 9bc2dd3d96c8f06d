"""Where every Hugging Face tensor lives in our params, described once for load and save.

`tensor_specs(cfg, layout, names)` maps each checkpoint tensor name to a `Spec`: its shape, the parameter leaves it
fills (`targets`: (path, group) pairs; group indexes the stacked leading axis of scanned layers, None when a leaf is
not stacked), and the conversion both ways. Expert layouts are chosen per MoE block: from the names present when
loading (so a release with fused main experts and per-expert MTP experts loads), from the `Layout` when saving.

Extension point: `register_extension(ext)` adds a group of tensors and config keys described elsewhere
(qwen35_jax/hf_vision.py: `model.visual.*`). `ext` provides `config_from_hf(config_dict, tensor_names)` ->
ModelConfig overrides, `config_to_hf(cfg, exported_dict)` -> dict and `tensor_specs(cfg)` -> {name: Spec}; its
specs are loaded, saved and checked exactly like the text tower's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qwen35_jax.config import ModelConfig
from qwen35_jax.model import layer_period

TEXT_PREFIX, VL_PREFIX = "model.", "model.language_model."


@dataclass(frozen=True)
class Layout:
    """How a checkpoint folder names its tensors. `experts` / `mtp_experts`: "per_expert"
    (`experts.{e}.{gate,up,down}_proj.weight`) or "fused" (`experts.gate_up_proj` [E, 2I, D] gate rows first,
    `experts.down_proj` [E, D, I]); `vision_language`: text tower under `model.language_model.` and config.json as
    the VL wrapper (`mtp.*` and `lm_head.weight` stay at the top level either way)."""

    experts: str = "per_expert"
    mtp_experts: str = "per_expert"
    vision_language: bool = False

    @property
    def prefix(self) -> str:
        return VL_PREFIX if self.vision_language else TEXT_PREFIX


LAYOUTS = {
    "transformers": Layout(),  # what transformers' save_pretrained writes
    "per_expert": Layout(),
    "fused": Layout("fused", "fused"),
    "release": Layout("fused", "per_expert", True),  # Qwen3.5 releases
    "release_packed": Layout("fused", "fused", True),  # Qwen3.6 releases pack the MTP experts too
}


def resolve_layout(layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


@dataclass
class Spec:
    """One Hugging Face tensor: its shape, the leaves it fills, how to write it into them and how to read it back.

    `put(sink, array)` writes into `sink[path][(group,) + index]`; `get(leaf)` builds the tensor from
    `leaf(path, group)`, the host copy of one parameter leaf (one group of it when stacked)."""

    shape: tuple
    put: Callable
    get: Callable
    targets: tuple = field(default=())


def _leaf(path, group=None, index=(), to_ours=lambda a: a, to_hf=lambda a: a, shape=None):
    """A Spec for a tensor stored at params[path][group][index] after `to_ours`."""

    def put(sink, a):
        sink[path][((group,) if group is not None else ()) + index] = to_ours(a)

    def get(leaf):
        return to_hf(leaf(path, group)[index])

    return Spec(shape, put, get, ((path, group),))


T = np.transpose
EXTENSIONS: list = []


def register_extension(ext) -> None:
    """Adds a module's tensors and config keys to every load and save (idempotent)."""
    if ext not in EXTENSIONS:
        EXTENSIONS.append(ext)


def detect_layout(names) -> Layout:
    """The layout a set of tensor names was written in (expert layouts of the first main and MTP MoE blocks;
    `tensor_specs` still decides each block from its own names)."""
    names = set(names)
    vl = any(n.startswith(VL_PREFIX) for n in names)
    main = "fused" if any(re.match(r".*layers\.\d+\.mlp\.experts\.gate_up_proj$", n) and not n.startswith("mtp.")
                          for n in names) else "per_expert"
    mtp = "fused" if "mtp.layers.0.mlp.experts.gate_up_proj" in names else "per_expert"
    return Layout(main, mtp, vl)


def tensor_specs(cfg: ModelConfig, layout=LAYOUTS["transformers"], names=None) -> dict[str, Spec]:
    """{HF tensor name: Spec} for `cfg`; with `names` (a loaded folder's tensors) each MoE block takes the expert
    layout its own tensors use."""
    layout = resolve_layout(layout)
    names = None if names is None else set(names)
    prefix = layout.prefix
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = {f"{prefix}embed_tokens.weight": _leaf(("embed_tokens", "embedding"), shape=(V, D)),
             f"{prefix}norm.weight": _leaf(("norm", "scale"), shape=(D,))}
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = _leaf(("lm_head",), to_ours=T, to_hf=T, shape=(V, D))
    period = layer_period(cfg.layer_kinds)
    for i, (mixer, ffn) in enumerate(cfg.layer_kinds):
        pre = f"{prefix}layers.{i}."
        _block_specs(cfg, specs, pre, ("layers", f"block_{i % period}"), i // period, mixer, ffn,
                     _experts_at(names, pre, layout.experts))
    if cfg.mtp_num_layers:
        m = ("mtp",)
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            specs[f"mtp.{name}.weight"] = _leaf(m + (name, "scale"), shape=(D,))
        specs["mtp.fc.weight"] = _leaf(m + ("fc", "kernel"), None, (), T, T, (D, 2 * D))
        _block_specs(cfg, specs, "mtp.layers.0.", m + ("layers_0",), None, "attn", "moe" if cfg.is_moe else "mlp",
                     _experts_at(names, "mtp.layers.0.", layout.mtp_experts))
    for ext in EXTENSIONS:
        specs.update(ext.tensor_specs(cfg))
    return specs


def _experts_at(names, pre, default):
    if names is None:
        return default
    if f"{pre}mlp.experts.gate_up_proj" in names:
        return "fused"
    if f"{pre}mlp.experts.0.gate_proj.weight" in names:
        return "per_expert"
    return default


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
    qkv, z, b_, a_ = (m + ("in_proj_qkv", "kernel"), m + ("in_proj_z", "kernel"), m + ("in_proj_b", "kernel"),
                      m + ("in_proj_a", "kernel"))

    def put_qkvz(sink, a):
        a = a.reshape(Hk, 2 * dk + 2 * r * dv, D)
        q, k = a[:, :dk].reshape(-1, D), a[:, dk:2 * dk].reshape(-1, D)
        v, zz = a[:, 2 * dk:2 * dk + r * dv].reshape(-1, D), a[:, 2 * dk + r * dv:].reshape(-1, D)
        sink[qkv][gi] = np.concatenate([q, k, v]).T
        sink[z][gi] = zz.T

    def get_qkvz(leaf):
        w_qkv, w_z = leaf(qkv, g).T, leaf(z, g).T
        q, k, v = w_qkv[:Hk * dk], w_qkv[Hk * dk:2 * Hk * dk], w_qkv[2 * Hk * dk:]
        parts = [q.reshape(Hk, dk, D), k.reshape(Hk, dk, D), v.reshape(Hk, r * dv, D), w_z.reshape(Hk, r * dv, D)]
        return np.concatenate(parts, axis=1).reshape(-1, D)

    def put_ba(sink, a):
        a = a.reshape(Hk, 2 * r, D)
        sink[b_][gi] = a[:, :r].reshape(Hv, D).T
        sink[a_][gi] = a[:, r:].reshape(Hv, D).T

    def get_ba(leaf):
        b = leaf(b_, g).T.reshape(Hk, r, D)
        a = leaf(a_, g).T.reshape(Hk, r, D)
        return np.concatenate([b, a], axis=1).reshape(-1, D)

    specs[pre + "in_proj_qkvz.weight"] = Spec((2 * Hk * dk + 2 * Hv * dv, D), put_qkvz, get_qkvz, ((qkv, g), (z, g)))
    specs[pre + "in_proj_ba.weight"] = Spec((2 * Hv, D), put_ba, get_ba, ((b_, g), (a_, g)))


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
    if expert_layout != "per_expert":
        raise ValueError(f"expert layout {expert_layout!r} is not one of per_expert, fused")
    for e in range(E):
        specs[pre + f"experts.{e}.gate_proj.weight"] = _leaf(f + ("gate_up_proj",), g, (e, slice(None), slice(0, F)),
                                                             T, T, (F, D))
        specs[pre + f"experts.{e}.up_proj.weight"] = _leaf(f + ("gate_up_proj",), g, (e, slice(None), slice(F, None)),
                                                           T, T, (F, D))
        specs[pre + f"experts.{e}.down_proj.weight"] = _leaf(f + ("down_proj",), g, (e,), T, T, (D, F))
