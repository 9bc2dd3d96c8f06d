"""The MoE layer: parity with transformers' Qwen3.5 sparse block, the load-balancing and router z-losses against
hand-computed formulas, expert parallelism on 8 fake CPU devices against the single-device layer, and an ahead-of-time
TPU compile of one expert-parallel layer (forward and backward)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import load_config
from qwen35_jax.layers import moe
from qwen35_jax.layers.moe import MoE
from qwen35_jax.train.losses import load_balancing_loss, router_z_loss
from tests.cpu_env import cpu_env
from tests.hf_fixtures import max_rel_err

REPO = Path(__file__).resolve().parents[2]


def random_params(module, x, mask, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    from qwen35_jax.sharding import unboxed

    shapes = unboxed(jax.eval_shape(module.init, jax.random.key(0), x, token_mask_BT=mask)["params"])
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def toy_config(**kw):
    base = dict(hidden_size=32, num_experts=16, experts_per_token=4, moe_intermediate_size=16,
                shared_expert_intermediate_size=24, dtype="float32", param_dtype="float32")
    return load_config("tiny", **{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# transformers parity


@pytest.mark.parametrize("B,T", [(2, 12), (1, 2), (2, 4)], ids=["sorted-dispatch", "few-tokens", "few-tokens-shared"])
def test_moe_layer_matches_transformers_sparse_block(B, T):
    """24 tokens (72 assignments) run the sorted grouped-matmul dispatch; 2 tokens (a decode or verify step: 6
    assignments of 8 experts) and 8 tokens (24 assignments: every expert shared by several tokens) loop over the
    distinct experts instead. All against transformers."""
    import torch
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    from qwen35_jax import hf
    from tests.hf_fixtures import hf_config

    hf_cfg = hf_config("qwen3_5_moe")
    cfg = hf.config_from_hf(hf_cfg.to_dict())
    assert cfg.num_experts == hf_cfg.num_experts and cfg.experts_per_token == hf_cfg.num_experts_per_tok
    torch.manual_seed(0)
    block = Qwen3_5MoeSparseMoeBlock(hf_cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 2.0 if name == "gate.weight" else 0.3  # a decisive router: no near-ties in top-k
            p.copy_(torch.randn(p.shape, generator=gen) * scale / np.sqrt(p.shape[-1]))
    w = {n: p.detach().numpy() for n, p in block.named_parameters()}
    swap = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731  HF stores [out, in]; we store [in, out]
    params = {"gate": w["gate.weight"].T, "gate_up_proj": swap(w["experts.gate_up_proj"]),
              "down_proj": swap(w["experts.down_proj"]), "shared_expert_gate": w["shared_expert_gate.weight"].T,
              "shared_expert": {n: {"kernel": w[f"shared_expert.{n}.weight"].T}
                                for n in ("gate_proj", "up_proj", "down_proj")}}
    x = np.random.default_rng(1).normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    apply = lambda p, x: MoE(cfg).apply({"params": p}, x, token_mask_BT=jnp.ones((B, T), bool))  # noqa: E731
    p = jax.tree.map(jnp.asarray, params)
    ours, stats = jax.jit(apply)(p, jnp.asarray(x))
    with torch.no_grad():
        ref = block(torch.from_numpy(x)).numpy()
    assert max_rel_err(ours, ref) <= 1e-5
    assert float(jnp.sum(stats["counts"])) == B * T * cfg.experts_per_token
    jaxpr = str(jax.make_jaxpr(apply)(p, jnp.asarray(x)))
    sorted_dispatch = B * T * cfg.experts_per_token > moe.FEW_ROWS_MAX
    assert (" while[" in jaxpr) == sorted_dispatch  # the gmm work-item loop
    # few tokens: the loop over distinct experts skips its unused slots by a cond; many: the padded dispatch's cond
    padded = moe.padded_slots(B * T * cfg.experts_per_token, cfg.num_experts) > 0
    assert ("cond[" in jaxpr) == (not sorted_dispatch or padded)


@pytest.mark.parametrize("N", [1, 3, 12])
def test_distinct_expert_loop_equals_sorted_dispatch_values_and_gradients(N):
    """The few-token path against the sorted grouped-matmul dispatch (`impl="reference"`) on the same assignments,
    including repeated experts across tokens and fewer distinct experts than loop slots: outputs and gradients
    with respect to the tokens, the routing weights and both expert weight tensors."""
    E, D, F, k = 16, 32, 16, 4
    rng = np.random.default_rng(N)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    experts = jnp.asarray(np.stack([rng.choice(6, k, replace=False) for _ in range(N)]), jnp.int32)  # 6 of 16 used
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(N, k)), jnp.float32)
    wgu = jnp.asarray(0.3 * rng.normal(size=(E, D, 2 * F)), jnp.float32)
    wd = jnp.asarray(0.3 * rng.normal(size=(E, F, D)), jnp.float32)

    def loss(impl, x, w, wgu, wd):
        y = moe.dispatch_combine(x, w, experts, wgu, wd, impl=impl)
        return jnp.sum(jnp.sin(y)), y

    (l0, y0), g0 = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3), has_aux=True)(
        x, weights, wgu, wd)
    (l1, y1), g1 = jax.value_and_grad(lambda *a: loss("auto", *a), argnums=(0, 1, 2, 3), has_aux=True)(
        x, weights, wgu, wd)
    assert "cond[" in str(jax.make_jaxpr(lambda *a: loss("auto", *a))(x, weights, wgu, wd))
    assert max_rel_err(y1, y0) <= 1e-6
    for name, a, b in zip(("x", "weights", "w_gate_up", "w_down"), g1, g0):
        assert max_rel_err(a, b) <= 1e-5, name
    assert float(jnp.abs(g1[2][6:]).max()) == 0.0  # experts no token routes to get no gradient


@pytest.mark.parametrize("routing,slack", [("balanced", moe.PADDED_SLACK), ("balanced", 16.0),
                                           ("one-expert-heavy", moe.PADDED_SLACK)],
                         ids=["padded-default-slack", "padded-every-row-fits", "over-slots-falls-back"])
def test_padded_dispatch_equals_grouped_matmul_values_and_gradients(routing, slack):
    """The padded expert-slot dispatch (CPU/GPU) against the sorted grouped-matmul dispatch's reference
    (`impl="reference"`, a masked matmul per group) on the same 2048 assignments: outputs and gradients with respect
    to the tokens, the routing weights and both expert weight tensors. Balanced routing fits the default slots; a
    slack of 16 (the number of experts) gives every expert room for all rows; an expert taking about two thirds of
    the tokens exceeds its slots, so both grouped matmuls and their gradients run on the sorted layout."""
    E, D, F, k, N = 16, 32, 16, 4, 512
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    p = np.ones(E) if routing == "balanced" else np.r_[30.0, np.ones(E - 1)]
    experts = jnp.asarray(np.stack([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(N)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(N, k)), jnp.float32)
    wgu = jnp.asarray(0.3 * rng.normal(size=(E, D, 2 * F)), jnp.float32)
    wd = jnp.asarray(0.3 * rng.normal(size=(E, F, D)), jnp.float32)
    slots = moe.padded_slots(N * k, E, slack)
    fits = int(np.bincount(np.asarray(experts).ravel(), minlength=E).max()) <= slots
    assert slots > 0 and fits == (routing == "balanced")

    def loss(impl, x, w, wgu, wd):
        y = moe.dispatch_combine(x, w, experts, wgu, wd, impl=impl, slack=slack)
        return jnp.sum(jnp.sin(y)), y

    (_, y0), g0 = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3), has_aux=True)(
        x, weights, wgu, wd)
    (_, y1), g1 = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3), has_aux=True))(
        x, weights, wgu, wd)
    assert "cond[" in str(jax.make_jaxpr(lambda *a: loss("xla", *a))(x, weights, wgu, wd))
    assert "cond[" not in str(jax.make_jaxpr(lambda *a: loss("reference", *a))(x, weights, wgu, wd))
    assert max_rel_err(y1, y0) <= 1e-6
    for name, a, b in zip(("x", "weights", "w_gate_up", "w_down"), g1, g0):
        assert max_rel_err(a, b) <= 1e-5, name
    assert float(jnp.abs(y1).max()) > 0.1  # no row lost to a slot past its expert's load


def test_padded_slots():
    """Slack x the balanced load, rounded up to 8; none for slack 0 or a few rows per expert."""
    assert moe.padded_slots(8192, 16) == 640          # 1.25 x 512
    assert moe.padded_slots(8192, 16, 0) == 0
    assert moe.padded_slots(8192, 16, 0.5) == 0       # fewer slots than rows: the sorted layout would not fit
    assert moe.padded_slots(1024, 512) == 0           # 2 rows per expert: 8 slots each would be 4x the work
    assert moe.padded_slots(20480, 512) == 56         # 40 rows per expert: 50 -> 56


# ---------------------------------------------------------------------------------------------------------------
# Token slices (moe_token_chunks)


@pytest.mark.parametrize("chunks", [2, 3], ids=["even", "padded"])
def test_token_chunks_change_memory_not_numbers(chunks):
    """The routed experts on strided token slices in turn give the same output and gradients as one dispatch (26
    tokens: 3 slices need one zero-weight padding row)."""
    B, T = 2, 13
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2)
    cot = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
    params = random_params(MoE(toy_config()), x, mask)

    def step(cfg):
        def loss(p, x):
            y, st = MoE(cfg).apply({"params": p}, x, token_mask_BT=mask)
            return jnp.sum(y * cot) + jnp.sum(st["counts"] * st["probs"]), y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        return y, grads

    (y0, g0), (y, g) = step(toy_config()), step(toy_config(moe_token_chunks=chunks))
    jaxpr = str(jax.make_jaxpr(lambda x: MoE(toy_config(moe_token_chunks=chunks)).apply(
        {"params": params}, x, token_mask_BT=mask))(x))
    assert f"length={chunks}" in jaxpr, "the slices did not run"
    assert max_rel_err(y, y0) <= 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g0)):
        assert max_rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_token_chunks_apply_the_capacity_per_slice():
    """With a capacity factor each strided slice is its own dispatch group: the oracle runs the capped layer on
    tokens 0, 2, 4, ... and 1, 3, 5, ... separately (more than FEW_ROWS_MAX assignments: a decode step's few
    tokens are never sliced)."""
    B, T, D = 2, 12, 32
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, D)), jnp.float32)
    capped = MoE(toy_config(capacity_factor=0.5))
    params = random_params(capped, x, jnp.ones((B, T), bool))
    apply = lambda m, xb: m.apply({"params": params}, xb, token_mask_BT=jnp.ones(xb.shape[:2], bool))[0]  # noqa
    flat = x.reshape(B * T, D)
    oracle = np.zeros((B * T, D), np.float32)
    for i in range(2):
        oracle[i::2] = np.asarray(apply(capped, flat[i::2][None]))[0]
    y = apply(MoE(toy_config(capacity_factor=0.5, moe_token_chunks=2)), x)
    assert max_rel_err(y, oracle.reshape(B, T, D)) <= 1e-5
    assert max_rel_err(apply(capped, x), oracle.reshape(B, T, D)) > 1e-2, "the slices should drop other rows"


# ---------------------------------------------------------------------------------------------------------------
# Load-balancing and z-loss by hand


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_load_balancing_and_z_loss_equal_the_formulas_by_hand():
    """6 tokens (the last is padding), 4 experts, top-2, pooled over 2 MoE layers (architecture.md section 6)."""
    E, k, D = 4, 2, 8
    cfg = load_config("tiny", hidden_size=D, num_experts=E, experts_per_token=k, moe_intermediate_size=8,
                      shared_expert_intermediate_size=0, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 6, D)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0]], bool)
    layers = [random_params(MoE(cfg), x, mask, seed=s, scale=1.0) for s in (0, 1)]
    router_stats = jax.jit(lambda p, m: MoE(cfg).apply({"params": p}, x, token_mask_BT=m)[1])
    stats = [router_stats(p, mask) for p in layers]
    pooled = jax.tree.map(lambda *a: jnp.stack(a), *stats)

    counts, prob_sums, z_sq, tokens = np.zeros(E), np.zeros(E), 0.0, 0
    for p in layers:
        logits = np.asarray(x[0], np.float64) @ np.asarray(p["gate"], np.float64)  # [6, E]
        probs = _softmax(logits)
        for t in range(5):  # token 5 is padding
            top = np.argsort(-probs[t])[:k]
            counts += np.eye(E)[top].sum(0)
            prob_sums += probs[t]
            z_sq += np.log(np.exp(logits[t]).sum()) ** 2
            tokens += 1
    f, P = counts / tokens, prob_sums / tokens
    assert np.isclose(f.sum(), k)
    aux = E * np.sum(f * P)
    assert float(load_balancing_loss(pooled, E)) == pytest.approx(aux, rel=1e-5)
    assert float(router_z_loss(pooled)) == pytest.approx(z_sq / tokens, rel=1e-5)
    # the padding token must matter if it were counted (so the exclusion above is tested)
    unmasked = [router_stats(p, jnp.ones_like(mask)) for p in layers]
    lb_all = float(load_balancing_loss(jax.tree.map(lambda *a: jnp.stack(a), *unmasked), E))
    assert abs(lb_all - aux) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Expert parallelism on 8 fake CPU devices

MESHES = [{"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 4}]
CHUNKED_MESH = {"fsdp": 2, "expert": 4}  # also run with moe_token_chunks=3 (strided slices of every token shard)
CAPACITY_MESH = {"data": 2, "tensor": 2, "expert": 2}  # tokens split 4 ways, replicated over tensor


def ep_report(meshes, capacity_mesh) -> dict:
    """Runs in a process with 8 CPU devices: max relative errors of the expert-parallel layer against the
    single-device layer (output, router stats, gradients w.r.t. every parameter and the input) per mesh; with a
    capacity factor, against the single-device layer run on each token shard alone."""
    from qwen35_jax.sharding import batch_sharding, make_mesh, param_shardings, spec_for, use_mesh

    assert jax.device_count() == 8
    cfg = toy_config()
    B, T, D = 8, 6, cfg.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2)
    cot = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    mod = MoE(cfg)
    params = random_params(mod, x, mask)
    declared = jax.eval_shape(mod.init, jax.random.key(0), x, token_mask_BT=mask)["params"]  # logical axes

    def loss(p, x):  # the stats enter the loss so that the router's gradient through them is checked too
        y, st = mod.apply({"params": p}, x, token_mask_BT=mask)
        return jnp.sum(y * cot) + jnp.sum(st["counts"] * st["probs"]) + st["z_sq"], (y, st)

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    ref = jax.jit(step)(params, x)
    report = {}
    for shape, chunks in [(m, 1) for m in meshes] + [(CHUNKED_MESH, 3)]:
        mesh = make_mesh(shape)
        mod = MoE(toy_config(moe_token_chunks=chunks))
        with use_mesh(mesh):
            ps = jax.device_put(params, param_shardings(declared, mesh))
            xs = jax.device_put(x, batch_sharding(mesh, 3, batch_size=B))
            fn = jax.jit(step)
            hlo = fn.lower(ps, xs).as_text()
            got = fn(ps, xs)
        (_, (y, st)), grads = got
        (_, (y0, st0)), grads0 = ref
        report[json.dumps(shape) + ("" if chunks == 1 else f" chunks {chunks}")] = {
            "all_to_all": "all_to_all" in hlo, "y": max_rel_err(y, y0),
            "stats": max(max_rel_err(st[n], st0[n]) for n in st0),
            "grads": {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): max_rel_err(g, g0)
                      for (path, g), g0 in
                      zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0))}}

    # Capacity factor: every expert keeps at most cf x balanced rows of each token shard (dispatch group).
    mesh = make_mesh(capacity_mesh)
    shards = int(np.prod([mesh.shape[a] for a in np.atleast_1d(spec_for(("batch",), (B * T,), mesh)[0])]))
    capped = MoE(toy_config(capacity_factor=0.5))
    apply = lambda p, xb: capped.apply({"params": p}, xb, token_mask_BT=jnp.ones(xb.shape[:2], bool))[0]  # noqa
    per_shard = jax.jit(lambda p, x: jax.lax.map(lambda xs: apply(p, xs), x.reshape(shards, B // shards, T, D)))
    oracle = np.asarray(per_shard(params, x)).reshape(B, T, D)
    with use_mesh(mesh):
        ps = jax.device_put(params, param_shardings(declared, mesh))
        y = jax.jit(apply)(ps, jax.device_put(x, batch_sharding(mesh, 3, batch_size=B)))
    dropless = np.asarray(MoE(cfg).apply({"params": params}, x, token_mask_BT=mask)[0])
    report["capacity"] = {"shards": shards, "y": max_rel_err(y, oracle), "dropped": max_rel_err(oracle, dropless)}
    return report


@pytest.fixture(scope="module")
def ep_results():
    script = f"import json; from tests.layers.test_moe import ep_report; print(json.dumps(ep_report({MESHES!r}, " \
             f"{CAPACITY_MESH!r})))"
    env = cpu_env(8)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", [json.dumps(m) for m in MESHES] + [json.dumps(CHUNKED_MESH) + " chunks 3"],
                         ids=lambda m: "x".join(f"{k}{v}" for k, v in json.loads(m.split(" chunks")[0]).items())
                         + (" chunks" in m) * "-chunked")
def test_expert_parallel_output_and_gradients_equal_single_device(ep_results, mesh):
    r = ep_results[mesh]
    assert r["all_to_all"], "the expert-parallel path did not run"
    assert r["y"] <= 1e-5 and r["stats"] <= 1e-5
    assert set(r["grads"]) >= {"0/gate", "0/gate_up_proj", "0/down_proj", "0/shared_expert_gate", "1"}
    assert max(r["grads"].values()) <= 1e-5, r["grads"]


def test_expert_parallel_capacity_factor_drops_per_token_shard(ep_results):
    r = ep_results["capacity"]
    assert r["shards"] == 4
    assert r["dropped"] > 1e-2, "capacity 0.5 should drop rows (else this test checks nothing)"
    assert r["y"] <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time TPU compile


def test_aot_compile_expert_parallel_layer_for_tpu():
    """Real XLA:TPU + Mosaic compile (no TPU needed) of one expert-parallel MoE layer, forward and backward, on a
    v5e 2x2 with expert=4: 64 experts, H 1024, I 256, 4096 tokens, bf16."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed to compile for TPU on a CPU host")
    from pallas_kernels import compile_for
    from qwen35_jax.sharding import batch_sharding, make_mesh, param_shardings, unboxed, use_mesh
    from qwen35_jax.train.aot import topology_devices, tpu_env

    tpu_env()
    mesh = make_mesh({"expert": 4}, topology_devices("v5e:2x2"))
    B, T, D = 4, 1024, 1024
    cfg = load_config("tiny", hidden_size=D, num_experts=64, experts_per_token=8, moe_intermediate_size=256,
                      shared_expert_intermediate_size=256, dtype="bfloat16", param_dtype="bfloat16")
    mod = MoE(cfg)
    declared = jax.eval_shape(mod.init, jax.random.key(0), jnp.zeros((B, T, D), jnp.bfloat16),
                              token_mask_BT=jnp.ones((B, T), bool))["params"]
    shapes = unboxed(declared)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          param_shardings(declared, mesh))
    x = jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=batch_sharding(mesh, 3, batch_size=B))
    mask = jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=batch_sharding(mesh, 2, batch_size=B))

    def loss(p, x, m):
        y, st = mod.apply({"params": p}, x, token_mask_BT=m)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(st["counts"] * st["probs"])

    with use_mesh(mesh), compile_for("tpu"):  # gmm impl "auto" -> the Pallas kernels, compiled Mosaic
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x, mask).compile()
    hlo = compiled.as_text()
    assert "all-to-all" in hlo and "tpu_custom_call" in hlo  # tokens travel; the Pallas gmm kernels run
    experts_bytes = sum(np.prod(shapes[n].shape) * 2 for n in ("gate_up_proj", "down_proj"))
    args = compiled.memory_analysis().argument_size_in_bytes
    # each chip holds a quarter of the experts (plus a quarter of the tokens and the small replicated weights)
    assert args < experts_bytes / 2, (args, experts_bytes)
