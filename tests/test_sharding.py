"""Sharding declared where parameters are created: every weight of every preset names its logical axes, and those
match the architecture (which dimension reads the residual stream, which produces heads), square matrices included;
an undeclared parameter is an error; optimizer state follows the parameter tree by structure, not by name."""

from __future__ import annotations

import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from qwen35_jax import init_params, load_config
from qwen35_jax.config import preset_names
from qwen35_jax.layers.common import dense, param
from qwen35_jax.model import param_axes
from qwen35_jax.schema import ConfigError
from qwen35_jax.sharding import (DEFAULT_RULES, MESH_AXES, LogicalAxes, UndeclaredParameterError, logical_axes,
                                 make_mesh, spec_for, state_shardings)

# The architecture, written independently of the layer code: parameter path (regex on "a/b/c") -> logical axes
# (HF orientation: a projection's input dimension first; q/k/v read the residual stream, o/out/down write it).
ARCHITECTURE = [
    (r"^embed_tokens/embedding$", ("vocab", "embed")),
    (r"^lm_head$", ("embed", "vocab")),
    (r"mixer/q_proj/kernel$", ("embed", "heads")),
    (r"mixer/[kv]_proj/kernel$", ("embed", "kv_heads")),
    (r"mixer/o_proj/kernel$", ("heads", "embed")),
    (r"mixer/in_proj_(qkv|z|a|b)/kernel$", ("embed", "heads")),
    (r"mixer/out_proj/kernel$", ("heads", "embed")),
    (r"mixer/conv1d$", ("conv", "heads")),
    (r"mixer/(A_log|dt_bias)$", ("heads",)),
    (r"ffn/gate$", ("embed", None)),
    (r"ffn/gate_up_proj$", ("expert", "embed", "mlp")),
    (r"ffn/down_proj$", ("expert", "mlp", "embed")),
    (r"ffn/shared_expert_gate$", ("embed", None)),
    (r"ffn(/shared_expert)?/(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"ffn(/shared_expert)?/down_proj/kernel$", ("mlp", "embed")),
    (r"/scale$", ("norm",)),
    (r"^mtp/fc/kernel$", (None, "embed")),
]


def expected_axes(path: str):
    hits = [axes for pattern, axes in ARCHITECTURE if re.search(pattern, path)]
    assert len(hits) == 1, f"{path}: {len(hits)} architecture rules match"
    return (("layers",) if path.startswith("layers/") else ()) + hits[0]


def declared(cfg):
    axes = param_axes(cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    flat_axes = {jax.tree_util.keystr(p, simple=True, separator="/"): a
                 for p, a in jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, LogicalAxes))}
    flat_shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): s.shape
                   for p, s in jax.tree_util.tree_leaves_with_path(shapes)}
    assert flat_axes.keys() == flat_shapes.keys()
    return flat_axes, flat_shapes


def size_of(cfg, axis: str, path: str):
    """What each logical axis must measure in this config (an independent check of orientation by size)."""
    if axis == "heads" and path.endswith("o_proj/kernel"):
        return cfg.num_heads * cfg.head_dim
    if axis == "heads" and path.endswith(("out_proj/kernel", "in_proj_z/kernel")):
        return cfg.gdn_num_value_heads * cfg.gdn_value_dim
    if axis == "heads" and path.endswith(("A_log", "dt_bias", "in_proj_a/kernel", "in_proj_b/kernel")):
        return cfg.gdn_num_value_heads
    if axis == "heads" and path.endswith(("conv1d", "in_proj_qkv/kernel")):
        return cfg.gdn_conv_dim
    return {"embed": cfg.hidden_size, "vocab": cfg.vocab_size, "expert": cfg.num_experts,
            "kv_heads": cfg.num_kv_heads * cfg.head_dim, "conv": cfg.gdn_conv_kernel}.get(axis)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_declares_the_architectures_axes(name):
    cfg = load_config(name)
    flat_axes, flat_shapes = declared(cfg)
    for path, axes in flat_axes.items():
        assert tuple(axes) == expected_axes(path), path
        assert len(axes) == len(flat_shapes[path]), path
        for axis, dim in zip(axes, flat_shapes[path]):
            want = size_of(cfg, axis, path)
            assert want is None or dim == want, (path, axis, dim, want)


def test_square_matrices_get_the_right_orientation():
    """hidden == heads * head_dim == Gated DeltaNet value width: the shapes cannot tell o_proj's input from its
    output, the declaration does; on a {fsdp: 2, tensor: 2} mesh o_proj is P(tensor, fsdp), q_proj P(fsdp, tensor)."""
    cfg = load_config("tiny", hidden_size=64, num_heads=4, head_dim=16, attn_output_gate="none", num_kv_heads=4,
                      gdn_num_value_heads=4, gdn_value_dim=16, mtp_num_layers=0)
    flat_axes, flat_shapes = declared(cfg)
    o = "layers/block_3/mixer/o_proj/kernel"
    q = "layers/block_3/mixer/q_proj/kernel"
    out = "layers/block_0/mixer/out_proj/kernel"
    assert flat_shapes[o] == flat_shapes[q] == flat_shapes[out] == (1, 64, 64)  # square
    mesh = types.SimpleNamespace(shape={a: {"fsdp": 2, "tensor": 2}.get(a, 1) for a in MESH_AXES})
    assert spec_for(flat_axes[o], flat_shapes[o], mesh) == P(None, "tensor", "fsdp")
    assert spec_for(flat_axes[q], flat_shapes[q], mesh) == P(None, "fsdp", "tensor")
    assert spec_for(flat_axes[out], flat_shapes[out], mesh) == P(None, "tensor", "fsdp")


class Undeclared(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = param(self, "w", nn.initializers.zeros, (x.shape[-1], 3), jnp.float32, ("embed", "mlp"))
        v = self.param("bias", nn.initializers.zeros, (3,), jnp.float32)  # no logical axes
        return x @ w + v


def test_an_undeclared_parameter_is_an_error():
    boxed = jax.eval_shape(Undeclared().init, jax.random.key(0), jnp.zeros((2, 4)))["params"]
    with pytest.raises(UndeclaredParameterError, match=r"parameter bias \(3,\) has no logical axes"):
        logical_axes(boxed)
    with pytest.raises(ValueError, match=r"unknown logical axis 'hedas' \(did you mean 'heads'\?\)"):
        dense(4, ("embed", "hedas"), dtype=jnp.float32, param_dtype=jnp.float32, std=0.02, name="x")


def test_optimizer_state_follows_the_parameter_tree_not_names():
    """Adam moments take their parameter's sharding by position in the tree: renaming every parameter (so no name
    could be matched) leaves the state shardings equal to the parameter shardings."""
    mesh = make_mesh({}, jax.devices()[:1])
    cfg = load_config("tiny", mtp_num_layers=0)
    from qwen35_jax.model import abstract_params
    from qwen35_jax.sharding import param_shardings, unboxed

    boxed = abstract_params(cfg)
    renamed = jax.tree_util.tree_unflatten(  # the same tree under names no rule could recognise
        jax.tree.structure({f"p{i}": 0 for i in range(len(jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
            x, nn.Partitioned))))}), jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    for tree in (boxed, renamed):
        p_shard = param_shardings(tree, mesh)
        shapes = unboxed(tree)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
        state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                               shapes)
        s_shard = state_shardings(state, p_shard, mesh)
        adam = s_shard["opt_state"][1][0]
        assert jax.tree.structure(adam.mu) == jax.tree.structure(p_shard)
        assert jax.tree.leaves(adam.mu) == jax.tree.leaves(p_shard) == jax.tree.leaves(adam.nu)
        assert s_shard["step"].spec == P() and adam.count.spec == P()


def test_mesh_mistakes_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"mesh axis 'tensr' is unknown \(did you mean 'tensor'\?\)"):
        make_mesh({"tensr": 2})
    n = jax.device_count()
    with pytest.raises(ConfigError, match=rf"mesh {{'fsdp': {n + 1}, 'data': 1}} needs {n + 1} devices, have {n}"):
        make_mesh({"fsdp": n + 1, "data": 1})
    with pytest.raises(ConfigError, match="do(es)? not divide the"):
        make_mesh({"fsdp": n + 1})


def test_rules_cover_every_declared_axis():
    cfg = load_config("qwen3.5-35b-a3b")
    used = {a for axes in jax.tree.leaves(param_axes(cfg), is_leaf=lambda x: isinstance(x, LogicalAxes))
            for a in axes if a is not None}
    assert used <= set(DEFAULT_RULES)


VISION = [
    (r"^visual/patch_embed/kernel$", (None, "embed")), (r"^visual/patch_embed/bias$", ("embed",)),
    (r"^visual/pos_embed$", (None, "embed")),
    (r"^visual/blocks/qkv/kernel$", ("layers", "embed", "heads")), (r"^visual/blocks/qkv/bias$", ("layers", "heads")),
    (r"^visual/blocks/proj/kernel$", ("layers", "heads", "embed")), (r"^visual/blocks/proj/bias$", ("layers", "embed")),
    (r"^visual/blocks/fc1/kernel$", ("layers", "embed", "mlp")), (r"^visual/blocks/fc1/bias$", ("layers", "mlp")),
    (r"^visual/blocks/fc2/kernel$", ("layers", "mlp", "embed")), (r"^visual/blocks/fc2/bias$", ("layers", "embed")),
    (r"^visual/blocks/norm[12]/(scale|bias)$", ("layers", "norm")),
    (r"^visual/merger/norm/(scale|bias)$", ("norm",)),
    (r"^visual/merger/fc1/kernel$", (None, "mlp")), (r"^visual/merger/fc1/bias$", ("mlp",)),
    (r"^visual/merger/fc2/kernel$", ("mlp", "embed")), (r"^visual/merger/fc2/bias$", ("embed",)),
]


def test_vision_tower_declares_its_axes():
    cfg = load_config("tiny", mtp_num_layers=0, vision={"depth": 2, "hidden_size": 32, "intermediate_size": 48,
                                                        "num_heads": 2, "num_position_embeddings": 16})
    flat_axes, flat_shapes = declared(cfg)
    visual = {p: a for p, a in flat_axes.items() if p.startswith("visual/")}
    assert len(visual) == 21
    for path, axes in visual.items():
        hits = [want for pattern, want in VISION if re.search(pattern, path)]
        assert hits == [tuple(axes)], path
    assert flat_shapes["visual/merger/fc2/kernel"][-1] == cfg.hidden_size  # writes the text model's stream
