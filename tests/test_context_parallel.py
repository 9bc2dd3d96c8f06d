"""Context parallelism (`mesh={sequence: N}`) on 8 fake CPU devices: the hybrid model's loss and gradients (GDN,
gated attention, MoE, MTP head) equal the single-device ones, with packed documents that start inside a device's
slice, exactly on a slice boundary, and rows with leading padding; the conv halo, the carried delta-rule state and
the gathered K/V really run (ppermute / all_gather in the program)."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.cpu_env import cpu_env

SCRIPT = textwrap.dedent('''
    import json, sys, jax, jax.numpy as jnp, numpy as np
    from qwen35_jax import forward, init_params, load_config
    from qwen35_jax.sharding import make_mesh, param_shardings, use_mesh
    impl = sys.argv[1]
    cfg = load_config("tiny", vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                      gdn_num_key_heads=2, gdn_num_value_heads=4, gdn_key_dim=8, gdn_value_dim=8, num_experts=4,
                      experts_per_token=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      gdn_chunk_size=8, mtp_num_layers=1, attention_impl=impl, dtype="float32")
    B, T = 2, 128  # 16 tokens per device at sequence=8
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 61, (B, T)), rng.integers(0, 61, (B, T))
    seg = np.ones((B, T), np.int32)
    seg[0, 30:] = 2; seg[0, 64:] = 3; seg[0, 100:] = 4   # 64: a document starting exactly on a slice boundary
    seg[1, :5] = 0; seg[1, 77:] = 2                        # leading padding
    pos = np.concatenate([np.arange(T)[None]] * B).astype(np.int32)
    def loss(p, t, s, y):
        logits, aux = forward(cfg, p, t, segment_ids=s, positions=pos, return_aux=True, mtp_tokens=y)
        return (jnp.mean(jnp.square(logits)) + jnp.mean(jnp.square(aux["mtp_logits"]))
                + jnp.mean(logits[..., 0] * y))
    f = jax.value_and_grad(loss)
    params = init_params(cfg, jax.random.key(0))
    want, want_g = jax.jit(f)(params, tokens, seg, targets)
    res = {}
    for name, shape in (("sequence8", {"sequence": 8}), ("data2_sequence4", {"data": 2, "sequence": 4})):
        mesh = make_mesh(shape)
        p_sh = jax.device_put(params, param_shardings(cfg, mesh))
        with use_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(f)(p_sh, tokens, seg, targets))
            got, got_g = jax.jit(f)(p_sh, tokens, seg, targets)
        err = max(float(jnp.max(jnp.abs(a - b)) / (float(jnp.max(jnp.abs(b))) + 1e-30))
                  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
        res[name] = {"loss": float(got), "want": float(want), "grad_err": err, "ppermute": jaxpr.count("ppermute"),
                     "all_gather": jaxpr.count("all_gather")}
    print(json.dumps(res))
''')


@pytest.mark.parametrize("impl", ["xla_blocked"])
def test_sequence_mesh_forward_and_gradients_equal_one_device(impl):
    env = cpu_env(8)
    out = subprocess.run([sys.executable, "-c", SCRIPT, impl], env=env, capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in res.items():
        assert abs(r["loss"] - r["want"]) <= 1e-5 * abs(r["want"]), (name, r)
        assert r["grad_err"] < 1e-4, (name, r)
        # 3 GDN layers: conv halo (x, segment ids) and the state scan; 1 attention layer (+ MTP): K, V, ids gathered
        assert r["ppermute"] >= 3 * 4 and r["all_gather"] >= 3, (name, r)
