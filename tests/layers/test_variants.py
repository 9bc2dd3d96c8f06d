"""Token-mixer ablation variants: one linear-attention family (switches), the (name, class, letter) registry,
causality, packed documents, state sizes, and whole models built from compact patterns."""

import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import forward, init_params, load_config
from qwen35_jax.config import describe, expand_pattern, pattern_letters
from qwen35_jax.layers import MIXERS, GatedDeltaNet, LinearAttention, register_mixer
from qwen35_jax.layers.registry import letters, mixer_names
from tests.cpu_env import cpu_env

VARIANTS = ["softmax", "attn", "attn_headwise", "swa", "linear", "gla", "deltanet", "gdn", "conv"]
LETTERS = {"F": "softmax", "A": "attn", "H": "attn_headwise", "S": "swa", "L": "linear", "M": "gla", "D": "deltanet",
           "G": "gdn", "C": "conv"}

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


def test_registry_names_and_letters_round_trip():
    assert letters() == LETTERS and set(mixer_names()) == set(VARIANTS)
    for name in mixer_names():  # every letter parses to the mixer it prints as
        assert expand_pattern(pattern_letters((name,)), 1) == (name,) and name in MIXERS
    cfg = tiny(layer_pattern="FAHSLMDGC", num_layers=9)
    assert cfg.layer_pattern == tuple(LETTERS[c] for c in "FAHSLMDGC")
    assert " 9 layers FAHSLMDGC," in describe(cfg)  # `qwen35 info` prints the letters the parser reads
    with pytest.raises(ValueError, match="'G' is taken by 'gdn'"):
        register_mixer("other", GatedDeltaNet, "G")


def _decode(module, params, x_BTD):
    """A 12-token prompt (chunked), 3 single steps (recurrent), then a 4-token checkpointed verify pass."""
    cfg, B = module.cfg, x_BTD.shape[0]
    ones = jnp.ones(x_BTD.shape[:2], jnp.int32)
    step = jax.jit(lambda c, x_t: module.apply(params, x_t, segment_ids_BT=ones[:, :x_t.shape[1]], cache=c,
                                               cache_index=0))
    cache, ys = module.init_cache(cfg, B, x_BTD.shape[1], jnp.float32), []
    for lo, hi in ((0, 12), (12, 13), (13, 14), (14, 15)):
        y, cache = step(cache, x_BTD[:, lo:hi])
        ys.append(y)
    y, checkpoints = step(jax.tree.map(lambda a: a[:, None], cache), x_BTD[:, 15:19])  # one checkpoint position
    return jnp.concatenate(ys + [y], 1), checkpoints


def test_switches_on_reproduce_gated_deltanet_prefill_and_decode():
    """Plain linear attention's module with the decay and delta switches turned on is Gated DeltaNet: the same
    parameters and, bit for bit, the same outputs, prefill with packed documents and every decode path."""
    cfg = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 19, cfg.hidden_size))
    seg = jnp.array([[1] * 7 + [2] * 12, [1] * 17 + [0] * 2])
    switched = LinearAttention(cfg, decay=True, delta=True)
    params = random_params(GatedDeltaNet(cfg).init, x, segment_ids_BT=seg)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(switched.init, x, segment_ids_BT=seg))
    want = jax.jit(GatedDeltaNet(cfg).apply)(params, x, segment_ids_BT=seg)
    np.testing.assert_array_equal(jax.jit(switched.apply)(params, x, segment_ids_BT=seg), want)
    want_dec = _decode(GatedDeltaNet(cfg), params, x)
    jax.tree.map(np.testing.assert_array_equal, _decode(switched, params, x), want_dec)
    # and the decode paths are right: they continue the full forward
    full = jax.jit(GatedDeltaNet(cfg).apply)(params, x, segment_ids_BT=jnp.ones((2, 19), jnp.int32))
    np.testing.assert_allclose(want_dec[0], full, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("name,dt_range", [("gla", None), ("gdn", None), ("gdn", (1e-4, 1e-3))])
def test_decay_init_keeps_memory(name, dt_range):
    """From scratch, softplus(dt_bias) is log-uniform in [1e-3, 1e-1] (Mamba2 / FLA), not transformers' ones: with
    dt_bias = 1 and A up to 16 the initial decay is exp(-1.31 A) per token and Gated DeltaNet never left chance on
    MQAR. With a = 0 the initial per-token decays lie in [exp(-16 hi), 1). `gdn_dt_init_range` moves the range."""
    cfg = tiny(gdn_num_value_heads=256, **({} if dt_range is None else {"gdn_dt_init_range": list(dt_range)}))
    lo, hi = dt_range or (1e-3, 1e-1)
    x = jnp.zeros((1, 4, cfg.hidden_size))
    params = unbox(MIXERS[name](cfg).init(jax.random.key(0), x, segment_ids_BT=jnp.ones((1, 4), jnp.int32))["params"])
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert dt.min() >= lo * (1 - 1e-4) and dt.max() <= hi * (1 + 1e-4), (dt.min(), dt.max())
    log_dt = np.log(dt)  # spread over the whole range (log-uniform: about half below the geometric middle)
    mid = np.sqrt(lo * hi)
    assert log_dt.max() - log_dt.min() > 0.8 * np.log(hi / lo) and 0.35 < np.mean(dt < mid) < 0.65
    decay = np.exp(-np.exp(np.asarray(params["A_log"])) * dt)
    assert decay.min() >= np.exp(-16 * hi) - 1e-6 and decay.max() < 1


@pytest.mark.parametrize("bad", [[0.0, 1e-2], [1e-2, 1e-3], [1e-3]])
def test_dt_init_range_rejected(bad):
    with pytest.raises(Exception, match="gdn_dt_init_range"):
        tiny(gdn_dt_init_range=bad)


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
    assert MIXERS["conv"].state_size(cfg, 64) == MIXERS["conv"].state_size(cfg, 4096) == 3 * cfg.hidden_size


def test_short_conv_is_zoologys_gated_convolution_and_decodes():
    """ShortConv against a float64 loop of zoology's BaseConv (y_t = sum_j w_j x_(t-K+1+j) * (x_t W)), then
    token-by-token decoding and a checkpointed verify pass continuing the full forward."""
    cfg = tiny()
    T, K = 19, cfg.gdn_conv_kernel
    run, params = mixer_fn("conv", cfg, T=T)
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, T, cfg.hidden_size)))
    w = np.asarray(params["params"]["conv1d"], np.float64)
    W = np.asarray(params["params"]["in_proj"]["kernel"], np.float64)
    x64 = x.astype(np.float64)
    want = np.zeros_like(x64)
    for t in range(T):
        conv = sum(w[j] * x64[:, t - K + 1 + j] for j in range(K) if t - K + 1 + j >= 0)
        want[:, t] = conv * (x64[:, t] @ W)
    full = np.asarray(run(x, np.ones((2, T), np.int32), np.arange(T)[None]))
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    got, checkpoints = _decode(MIXERS["conv"](cfg), params, jnp.asarray(x))
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    # one window per verified position: the last equals the last K-1 inputs
    assert checkpoints["state"].shape == (2, 4, K - 1, cfg.hidden_size)
    np.testing.assert_allclose(checkpoints["state"][:, -1], x[:, T - K + 1:], rtol=1e-6)


@pytest.mark.parametrize("pattern", ["GLMD", "FSHA", "CFCG"])
def test_tiny_models_from_compact_patterns(pattern):
    cfg = tiny(layer_pattern=pattern)
    params = random_params(lambda key: init_params(cfg, key), seed=1)
    assert sum(a.size for a in jax.tree.leaves(params)) == cfg.param_counts()["total"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg, params, tokens))
    assert logits.shape == (2, 24, cfg.vocab_size) and np.isfinite(logits).all()


CONTEXT_PARALLEL = textwrap.dedent('''
    import json, jax, jax.numpy as jnp, numpy as np
    from qwen35_jax import load_config
    from qwen35_jax.layers import MIXERS
    from qwen35_jax.sharding import make_mesh, use_mesh
    cfg = load_config("tiny", hidden_size=16, gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8,
                      gdn_value_dim=8, gdn_chunk_size=4, dtype="float32")
    B, T = 2, 32  # 8 tokens per device
    x = jax.random.normal(jax.random.key(0), (B, T, 16))
    seg = np.ones((B, T), np.int32)
    seg[0, 5:] = 2; seg[0, 16:] = 3; seg[1, :3] = 0     # a document inside a slice, one on a slice boundary
    res = {}
    for name in ("linear", "gla", "deltanet", "gdn", "conv"):
        mixer = MIXERS[name](cfg)
        params = mixer.init(jax.random.key(1), x, segment_ids_BT=seg)
        # a fresh function per context: jit's trace cache would otherwise reuse the one-device program
        f = lambda: jax.value_and_grad(lambda p, x: jnp.sum(mixer.apply(p, x, segment_ids_BT=seg) ** 2), (0, 1))
        want, want_g = jax.jit(f())(params, x)
        with use_mesh(make_mesh({"sequence": 4})):
            jaxpr = str(jax.make_jaxpr(f())(params, x))
            got, got_g = jax.jit(f())(params, x)
        err = max(float(jnp.max(jnp.abs(a - b)) / (float(jnp.max(jnp.abs(b))) + 1e-30))
                  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
        res[name] = {"rel": abs(float(got) - float(want)) / abs(float(want)), "grad_err": err,
                     "ppermute": jaxpr.count("ppermute")}
    print(json.dumps(res))
''')


def test_family_under_context_parallelism_equals_one_device():
    """Every member's state update (and the gated short conv's halo) carries across the devices of a `sequence` mesh (the affine-map scan works for
    any update linear in the state): forward and gradients equal one device's with packed documents."""
    out = subprocess.run([sys.executable, "-c", CONTEXT_PARALLEL], env=cpu_env(4), capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in res.items():
        # the conv halo (values and segment ids); the family also carries its state across devices
        assert r["rel"] < 1e-5 and r["grad_err"] < 1e-4 and r["ppermute"] >= (2 if name == "conv" else 4), (name, r)


def test_attention_without_qk_norm_is_an_ablation_switch():
    """`attn_qk_norm: false` drops q_norm/k_norm (parameters, count and output change); Qwen3.5 checkpoints cannot
    express it, so the export refuses and names the switch."""
    from qwen35_jax.hf import CheckpointError
    from qwen35_jax.hf.config import config_to_hf

    cfg, off = tiny(), tiny(attn_qk_norm=False)
    run, params = mixer_fn("attn", cfg)
    _, params_off = mixer_fn("attn", off)
    assert {"q_norm", "k_norm"} <= set(params["params"]) and not {"q_norm", "k_norm"} & set(params_off["params"])
    assert MIXERS["attn"].num_params(off) == sum(a.size for a in jax.tree.leaves(params_off))
    assert MIXERS["attn"].num_params(cfg) - MIXERS["attn"].num_params(off) == 2 * cfg.head_dim
    x = np.asarray(jax.random.normal(jax.random.key(5), (1, 8, cfg.hidden_size)))
    seg, pos = np.ones((1, 8), np.int32), np.arange(8)[None]
    same = {k: v for k, v in params["params"].items() if k not in ("q_norm", "k_norm")}
    assert jax.tree.structure(same) == jax.tree.structure(params_off["params"])
    y_off = MIXERS["attn"](off).apply({"params": same}, x, segment_ids_BT=seg, positions_BT=pos)
    assert not np.allclose(run(x, seg, pos), y_off, atol=1e-4)  # the same projections, unnormalised q and k
    with pytest.raises(CheckpointError, match="qk norm False"):
        config_to_hf(load_config("tiny", attn_qk_norm=False))


@pytest.mark.parametrize("name", ["linear", "gla"])
def test_qk_l2norm_switch_for_the_additive_members(name):
    """`gdn_qk_l2norm: false` (the decay-only and plain members as GLA, Mamba2 and classic linear attention run):
    the same parameters and another output, equal to the layer written out independently in float64 (projections,
    conv + SiLU, the per-token update on raw q and k, gated RMSNorm, out_proj); decode continues the prefill. The
    delta-rule members and the HF export refuse it."""
    from qwen35_jax.hf import CheckpointError
    from qwen35_jax.hf.config import config_to_hf
    from qwen35_jax.schema import ConfigError

    cfg, off = tiny(layer_pattern="LM"), tiny(layer_pattern="LM", gdn_qk_l2norm=False)
    T = 21
    x = jax.random.normal(jax.random.key(3), (2, T, cfg.hidden_size))
    ones = jnp.ones((2, T), jnp.int32)
    params = random_params(MIXERS[name](cfg).init, x, segment_ids_BT=ones)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(MIXERS[name](off).init, x,
                                                                          segment_ids_BT=ones))
    on_y = jax.jit(MIXERS[name](cfg).apply)(params, x, segment_ids_BT=ones)
    off_y = jax.jit(MIXERS[name](off).apply)(params, x, segment_ids_BT=ones)
    assert not np.allclose(on_y, off_y, atol=1e-3)
    # an independent path: the state update written out per token in float64 on the module's own q, k, v, g, z
    p = params["params"]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    xs = f64(x)
    qkv = xs @ f64(p["in_proj_qkv"]["kernel"])
    K = cfg.gdn_conv_kernel
    w = f64(p["conv1d"])
    pad = np.concatenate([np.zeros((2, K - 1, qkv.shape[-1])), qkv], 1)
    conv = sum(pad[:, i:i + T] * w[i] for i in range(K))
    conv = conv / (1 + np.exp(-conv))
    Hk, Hv, dk, dv = cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim
    q = conv[..., :Hk * dk].reshape(2, T, Hk, dk).repeat(Hv // Hk, 2) * dk ** -0.5
    k = conv[..., Hk * dk:2 * Hk * dk].reshape(2, T, Hk, dk).repeat(Hv // Hk, 2)
    v = conv[..., 2 * Hk * dk:].reshape(2, T, Hv, dv)
    g = np.zeros((2, T, Hv))
    if name == "gla":
        a = xs @ f64(p["in_proj_a"]["kernel"])
        sp = np.log1p(np.exp(a + f64(p["dt_bias"])))
        g = -np.exp(f64(p["A_log"])) * sp
    S, o = np.zeros((2, Hv, dk, dv)), np.zeros((2, T, Hv, dv))
    for t in range(T):
        S = np.exp(g[:, t])[..., None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t])
    z = (xs @ f64(p["in_proj_z"]["kernel"])).reshape(2, T, Hv, dv)
    ms = np.mean(o * o, -1, keepdims=True)
    y = o / np.sqrt(ms + cfg.rms_norm_eps) * f64(p["norm"]["scale"]) * (z / (1 + np.exp(-z)))
    want = y.reshape(2, T, Hv * dv) @ f64(p["out_proj"]["kernel"])
    np.testing.assert_allclose(off_y, want, rtol=1e-4, atol=1e-5)
    # decode continues the prefill
    cache = MIXERS[name].init_cache(off, 2, T, jnp.float32)
    step = jax.jit(lambda c, x_t: MIXERS[name](off).apply(params, x_t, segment_ids_BT=ones[:, :x_t.shape[1]],
                                                          cache=c, cache_index=0))
    y0, cache = step(cache, x[:, :12])
    y1, cache = step(cache, x[:, 12:13])
    np.testing.assert_allclose(jnp.concatenate([y0, y1], 1), off_y[:, :13], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="gdn_qk_l2norm=false with delta-rule mixers"):
        tiny(gdn_qk_l2norm=False, layer_pattern="LG")
    with pytest.raises(ConfigError, match="stable only for unit keys"):
        LinearAttention(off, delta=True).init(jax.random.key(0), x, segment_ids_BT=ones)
    with pytest.raises(CheckpointError, match="linear-attention qk l2norm False"):
        config_to_hf(tiny(gdn_qk_l2norm=False, layer_pattern="A"))
