"""Model behaviour on CPU: causality (jit and no-jit), float64 gradients against finite differences, scan layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import forward, init_params, load_config
from qwen35_jax.model import layer_period


def small_cfg(**kw):
    base = dict(vocab_size=61, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16,
                gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8, gdn_value_dim=8, num_experts=4,
                experts_per_token=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                gdn_chunk_size=8, tie_word_embeddings=False)
    return load_config("tiny", **{**base, **kw})


@pytest.mark.parametrize("jit", [False, True])
def test_causality(jit):
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    fn = jax.jit(lambda p, t: forward(cfg, p, t)) if jit else (lambda p, t: forward(cfg, p, t))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 21))
    base = np.asarray(fn(params, tokens))
    for t in (0, 7, 13):
        changed = tokens.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 5) % cfg.vocab_size
        out = np.asarray(fn(params, changed))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_float64_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        cfg = small_cfg(param_dtype="float64", dtype="float64", num_experts=0, intermediate_size=24,
                        shared_expert_intermediate_size=0)
        params = init_params(cfg, jax.random.key(1))
        tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 11))

        def loss(p):
            logits = forward(cfg, p, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

        grads = jax.grad(loss)(params)
        direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
        eps = 1e-6
        plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
        minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        assert abs(float(numeric) - float(analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))


def test_scan_and_unrolled_stacks_agree():
    cfg = small_cfg(num_layers=8)
    params = init_params(cfg, jax.random.key(3))
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9))
    a = forward(cfg, params, tokens)
    b = forward(cfg.replace(scan_layers=False), params, tokens)
    c = forward(cfg.replace(remat="full"), params, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    assert params["layers"]["block_0"]["input_norm"]["scale"].shape == (2, cfg.hidden_size)


def test_remat_scopes_give_the_same_loss_gradients_and_parameter_names():
    """`remat: full` per block or per sublayer (norm + mixer, norm + FFN) recomputes, it never changes a number."""
    cfg = small_cfg(num_layers=4)
    params = init_params(cfg, jax.random.key(5))
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12))

    def loss_and_grads(c):
        def loss(p):
            logits = forward(c, p, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
        return jax.value_and_grad(loss)(params)

    ref_loss, ref_grads = loss_and_grads(cfg)
    for scope in ("block", "sublayer"):
        c = cfg.replace(remat="full", remat_scope=scope)
        assert jax.tree.structure(init_params(c, jax.random.key(5))) == jax.tree.structure(params), scope
        value, grads = loss_and_grads(c)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=f"{scope} {jax.tree_util.keystr(path)}")


def test_layer_period():
    assert layer_period([("gdn", "moe")] * 3 + [("attn", "moe")]) == 4
    kinds = [("gdn", "moe"), ("gdn", "mlp"), ("gdn", "moe"), ("attn", "moe")] * 2
    assert layer_period(kinds) == 4
    assert layer_period([("gdn", "mlp")] + [("gdn", "moe")] * 3) == 4


def test_router_stats_returned():
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(4))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 10))
    seg = np.ones((2, 10), np.int32)
    seg[1, :3] = 0
    _, aux = forward(cfg, params, tokens, segment_ids=seg, return_aux=True)
    stats = aux["router"]
    assert stats["counts"].shape == (cfg.num_layers, cfg.num_experts)
    np.testing.assert_allclose(stats["counts"].sum(-1), 17 * cfg.experts_per_token)
    np.testing.assert_allclose(stats["tokens"], 17)
    np.testing.assert_allclose(stats["probs"].sum(-1), 17, rtol=1e-5)


def test_token_range_error():
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\).*max 61"):
        forward(cfg, params, np.array([[1, 61]]))


def test_output_init_scale_scales_only_the_residual_branch_outputs():
    """Every o_proj / out_proj / down_proj (dense, shared expert, routed experts) starts at initializer_range x
    output_init_scale; every other parameter is the same draw as at scale 1."""
    cfg = small_cfg(layer_pattern="GGGA", mlp_only_layers=[1])
    base = jax.tree_util.tree_flatten_with_path(init_params(cfg, jax.random.key(3)))[0]
    half = jax.tree_util.tree_flatten_with_path(init_params(small_cfg(layer_pattern="GGGA", mlp_only_layers=[1],
                                                                      output_init_scale=0.5), jax.random.key(3)))[0]
    outputs = ("o_proj", "out_proj", "down_proj")
    scaled = set()
    for (path, a), (path2, b) in zip(base, half):
        name = jax.tree_util.keystr(path)
        assert name == jax.tree_util.keystr(path2)
        if any(f"'{o}'" in name for o in outputs):
            scaled.add("/".join([k.key for k in path if k.key != "kernel"][-2:]))  # parent/name
            np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-6, err_msg=name)
            assert np.std(np.asarray(a)) > 0
        else:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
    assert scaled == {"mixer/o_proj", "mixer/out_proj", "ffn/down_proj", "shared_expert/down_proj"}  # experts: ffn
    zero = init_params(small_cfg(output_init_scale=0.0), jax.random.key(3))
    leaves = jax.tree_util.tree_flatten_with_path(zero)[0]
    assert all(not np.any(np.asarray(v)) for p, v in leaves if any(f"'{o}'" in jax.tree_util.keystr(p)
                                                                   for o in outputs))
