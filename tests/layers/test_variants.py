"""Token-mixer ablation variants: kernels against their recurrences, causality, packed documents, state sizes, and
whole models built from compact patterns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import forward, init_params, load_config
from qwen35_jax.config import MIXER_LETTERS
from qwen35_jax.layers import MIXERS, GatedDeltaNet
from qwen35_jax.layers.variants import (LinearAttentionBlock, chunk_gated_linear_attention,
                                        recurrent_gated_linear_attention)

VARIANTS = ["softmax", "attn", "attn_headwise", "swa", "linear", "gla", "deltanet", "gdn"]
LETTERS = {"F": "softmax", "A": "attn", "H": "attn_headwise", "S": "swa", "L": "linear", "M": "gla", "D": "deltanet",
           "G": "gdn"}

unbox = nn.meta.unbox  # module.init boxes parameters with their logical axes


def tiny(**kw):
    base = dict(vocab_size=53, hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8,
                gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8, gdn_value_dim=8, gdn_chunk_size=8,
                num_experts=0, intermediate_size=32, sliding_window=0)
    return load_config("tiny", **{**base, **kw})


def random_params(init, *args, seed=0, **kwargs):
    """Parameters of `init`'s shapes filled with N(0, 0.3^2): no compile of the initialisers (keeps tests fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                        unbox(jax.eval_shape(init, jax.random.key(0), *args, **kwargs)))


def mixer_fn(name, cfg, T=8, seed=0):
    mixer = MIXERS[name](cfg)
    params = random_params(mixer.init, jnp.zeros((1, T, cfg.hidden_size)), segment_ids_BT=jnp.ones((1, T), jnp.int32),
                           positions_BT=jnp.arange(T)[None], seed=seed)

    @jax.jit
    def run(x_BTD, seg_BT, pos_BT):
        return mixer.apply(params, x_BTD, segment_ids_BT=seg_BT, positions_BT=pos_BT)
    return run, params


def test_registry_names_and_letters():
    for letter, name in LETTERS.items():
        assert MIXER_LETTERS[letter] == name and name in MIXERS
    assert tiny(layer_pattern="FAHSLMDG", num_layers=8).layer_pattern == tuple(LETTERS[c] for c in "FAHSLMDG")


@pytest.mark.parametrize("decay", [False, True], ids=["linear", "gla"])
def test_chunked_linear_attention_matches_recurrence(decay):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        B, T, Hk, Hv, dk, dv = 2, 23, 1, 2, 4, 3
        q, k = rng.normal(size=(2, B, T, Hk, dk))
        v = rng.normal(size=(B, T, Hv, dv))
        g = -rng.uniform(0.0, 1.5, size=(B, T, Hv)) if decay else np.zeros((B, T, Hv))
        seg = np.array([[1] * 5 + [2] * 12 + [3] * 6, [1] * 23])
        s0 = rng.normal(size=(B, Hv, dk, dv))
        kw = dict(initial_state=s0, output_final_state=True, segment_ids=seg, use_qk_l2norm=True)
        o_ref, s_ref = jax.jit(lambda *a: recurrent_gated_linear_attention(*a, **kw))(q, k, v, g)
        for C in (5, 64):  # several chunks with a padded tail; one chunk
            o, s = jax.jit(lambda *a: chunk_gated_linear_attention(*a, chunk_size=C, **kw))(q, k, v, g)
            np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)
        # and the reference is the textbook recurrence (row 1: one document, zero initial state)
        o_row = recurrent_gated_linear_attention(q, k, v, g, use_qk_l2norm=True)[0][1]
        qn, kn = (np.repeat(x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6), Hv // Hk, 1) for x in (q[1], k[1]))
        S = np.zeros((Hv, dk, dv))
        for t in range(T):
            S = np.exp(g[1, t])[:, None, None] * S + np.einsum("hk,hv->hkv", kn[t], v[1, t])
            np.testing.assert_allclose(o_row[t], np.einsum("hkv,hk->hv", S, qn[t] * dk ** -0.5), rtol=1e-12)


def test_block_with_decay_and_delta_is_gated_deltanet():
    cfg = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 19, cfg.hidden_size))
    seg = jnp.array([[1] * 7 + [2] * 12, [1] * 17 + [0] * 2])
    params = random_params(GatedDeltaNet(cfg).init, x, segment_ids_BT=seg)
    want = jax.jit(GatedDeltaNet(cfg).apply)(params, x, segment_ids_BT=seg)
    got = jax.jit(LinearAttentionBlock(cfg, decay=True, delta=True).apply)(params, x, segment_ids_BT=seg)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "gla", "deltanet"])
def test_linear_variants_chunked_equal_token_by_token(name):
    """The chunked prefill (T > 8) and the per-token recurrence (decode path, T = 1 steps) agree."""
    cfg = tiny()
    T = 21
    mixer = MIXERS[name](cfg)
    x = jax.random.normal(jax.random.key(2), (2, T, cfg.hidden_size))
    ones = jnp.ones((2, T), jnp.int32)
    params = random_params(mixer.init, x, segment_ids_BT=ones)
    full = jax.jit(mixer.apply)(params, x, segment_ids_BT=ones)
    cache = MIXERS[name].init_cache(cfg, 2, T, jnp.float32)
    step = jax.jit(lambda c, x_t: mixer.apply(params, x_t, segment_ids_BT=ones[:, :1], cache=c, cache_index=0))
    outs = []
    for t in range(T):
        y, cache = step(cache, x[:, t:t + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_linear_variants_have_their_gates_only():
    cfg = tiny()
    x = jnp.zeros((1, 4, cfg.hidden_size))
    init = lambda name: unbox(jax.eval_shape(MIXERS[name](cfg).init, jax.random.key(0), x,  # noqa: E731
                                             segment_ids_BT=jnp.ones((1, 4), jnp.int32))["params"])
    keys = {name: set(init(name)) for name in ("linear", "gla", "deltanet", "gdn")}
    common = {"in_proj_qkv", "in_proj_z", "conv1d", "norm", "out_proj"}
    assert keys["linear"] == common
    assert keys["gla"] == common | {"in_proj_a", "A_log", "dt_bias"}
    assert keys["deltanet"] == common | {"in_proj_b"}
    assert keys["gdn"] == keys["gla"] | keys["deltanet"]


@pytest.mark.parametrize("name", ["gla", "gdn"])
def test_decay_init_keeps_memory(name):
    """From scratch, softplus(dt_bias) is log-uniform in [1e-3, 1e-1] (Mamba2 / FLA), not transformers' ones: with
    dt_bias = 1 and A up to 16 the initial decay is exp(-1.31 A) per token and Gated DeltaNet never left chance on
    MQAR. With a = 0 the initial per-token decays lie in [exp(-1.6), 1)."""
    cfg = tiny(gdn_num_value_heads=256)
    x = jnp.zeros((1, 4, cfg.hidden_size))
    params = unbox(MIXERS[name](cfg).init(jax.random.key(0), x, segment_ids_BT=jnp.ones((1, 4), jnp.int32))["params"])
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5), (dt.min(), dt.max())
    log_dt = np.log(dt)  # spread over the whole range (log-uniform: about half below the geometric middle, 1e-2)
    assert log_dt.max() - log_dt.min() > 0.8 * np.log(100) and 0.35 < np.mean(dt < 1e-2) < 0.65
    decay = np.exp(-np.exp(np.asarray(params["A_log"])) * dt)
    assert decay.min() >= np.exp(-16 * 0.1) - 1e-6 and decay.max() < 1


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_and_documents_isolated(name):
    cfg = tiny(sliding_window=4 if name == "swa" else 0)
    T = 20
    run, _ = mixer_fn(name, cfg)
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, T, cfg.hidden_size)))
    seg = np.ones((1, T), np.int32)
    pos = np.arange(T)[None]
    base = np.asarray(run(x, seg, pos))
    t = 9
    x2 = x.copy()
    x2[:, t + 1:] += 1.0
    out = np.asarray(run(x2, seg, pos))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])
    # packed documents [a (7) | b (11) | padding (2)] give what each document gives alone (padded to T: one compile)
    cut, end = 7, 18
    seg_p = np.array([[1] * cut + [2] * (end - cut) + [0] * (T - end)], np.int32)
    pos_p = np.array([list(range(cut)) + list(range(end - cut)) + [0] * (T - end)])
    packed = np.asarray(run(x, seg_p, pos_p))
    alone = lambda a, b: np.asarray(run(np.pad(x[:, a:b], ((0, 0), (0, T - b + a), (0, 0))),  # noqa: E731
                                        np.array([[1] * (b - a) + [0] * (T - b + a)], np.int32), pos))[:, :b - a]
    np.testing.assert_allclose(packed[:, :cut], alone(0, cut), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, cut:end], alone(cut, end), rtol=1e-5, atol=1e-6)


def test_sliding_window_forgets_and_gate_shapes():
    cfg = tiny(sliding_window=4)
    run, params = mixer_fn("swa", cfg)
    x = np.asarray(jax.random.normal(jax.random.key(4), (1, 12, cfg.hidden_size)))
    seg, pos = np.ones((1, 12), np.int32), np.arange(12)[None]
    x2 = x.copy()
    x2[:, :3] += 1.0  # outside the window of positions >= 3 + 4 - 1 + 1
    np.testing.assert_allclose(run(x2, seg, pos)[:, 7:], run(x, seg, pos)[:, 7:], rtol=1e-5, atol=1e-6)
    D, H, K = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    x, ones = jnp.zeros((1, 4, D)), jnp.ones((1, 4), jnp.int32)
    shapes = lambda name: unbox(jax.eval_shape(MIXERS[name](cfg).init, jax.random.key(0), x,  # noqa: E731
                                               segment_ids_BT=ones, positions_BT=jnp.arange(4)[None])["params"])
    widths = {"softmax": H * K, "attn_headwise": H * (K + 1), "attn": 2 * H * K, "swa": 2 * H * K}
    for name, width in widths.items():
        assert shapes(name)["q_proj"]["kernel"].shape == (D, width), name
    for name in VARIANTS:
        assert MIXERS[name].num_params(cfg) == sum(a.size for a in jax.tree.leaves(shapes(name))), name


def test_state_sizes():
    cfg = tiny(head_dim=16, num_kv_heads=2, num_heads=4, gdn_num_value_heads=4, gdn_key_dim=8, gdn_value_dim=16)
    kv = 2 * 2 * 16
    assert MIXERS["attn"].state_size(cfg, 256) == kv * 256
    assert MIXERS["softmax"].state_size(cfg, 100) == kv * 100
    assert MIXERS["attn_headwise"].state_size(cfg, 100) == kv * 100
    assert MIXERS["swa"].state_size(cfg, 256) == kv * 64  # default window
    assert MIXERS["swa"].state_size(cfg, 32) == kv * 32
    assert MIXERS["swa"].state_size(cfg.replace(sliding_window=16), 256) == kv * 16
    conv = 3 * (2 * 1 * 8 + 4 * 16)  # (K - 1) * conv_dim
    for name in ("linear", "gla", "deltanet", "gdn"):
        assert MIXERS[name].state_size(cfg, 64) == MIXERS[name].state_size(cfg, 4096) == 4 * 8 * 16 + conv


@pytest.mark.parametrize("pattern", ["GLMD", "FSHA"])
def test_tiny_models_from_compact_patterns(pattern):
    cfg = tiny(layer_pattern=pattern)
    params = random_params(lambda key: init_params(cfg, key), seed=1)
    assert sum(a.size for a in jax.tree.leaves(params)) == cfg.param_counts()["total"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg, params, tokens))
    assert logits.shape == (2, 24, cfg.vocab_size) and np.isfinite(logits).all()
