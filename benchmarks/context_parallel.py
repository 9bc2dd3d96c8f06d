"""Context parallelism: communication per layer against compute, from the compiled programs, and scaling on fake
devices.

Part 1 (`comm`): one Gated DeltaNet layer and one gated-attention layer of Qwen3.5-35B-A3B (bf16, B = 1, T = 256k),
forward + backward, compiled for a TPU topology on this CPU host (libtpu) under `mesh={sequence: N}`: the
collective ops in the compiled HLO with their result bytes (per device), split by kind (collective-permute: the GDN
conv halo and state scan; all-gather / reduce-scatter: attention's K/V and their gradients; all-reduce: the
parameter gradients, summed over the sequence shards once per step), against the layer's FLOPs per device (the
model's analytic count and XLA's cost model). "break-even GB/s" is the bandwidth at which the activation exchanges
take as long as the compute at the chip's bf16 peak: the ICI must beat it for the exchange to hide.

Part 2 (`scaling`): the tiny hybrid model's forward + backward (B = 1) on 8 fake CPU devices under
`mesh={sequence: N}`, N = 1, 2, 4, 8, interleaved rounds; speedup over N = 1 and efficiency against the ideal on
this host (min(N, cores): fake devices share the host's cores).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/context_parallel.py --out benchmarks/results/context_parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_json  # noqa: E402

PEAK_BF16 = {"v5p": 459e12, "v5e": 197e12, "v6e": 920e12}  # per chip (kernels.md)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict:
    """{kind: [count, result bytes]} over the compiled HLO's collectives (async pairs counted once, at -start)."""
    out = {k: [0, 0] for k in COLLECTIVES}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\(",
                      line)
        if not m or "-done" in line.split("=")[1][:80]:
            continue
        shapes = re.findall(r"(bf16|f16|f32|s32|u32|pred|s8|u8|f64|s64)\[([\d,]*)\]", m.group(1))
        sizes = [DTYPE_BYTES[d] * (eval("*".join(s.split(",")) or "1")) for d, s in shapes]  # noqa: S307
        if sizes:
            out[m.group(2)][0] += 1
            out[m.group(2)][1] += max(sizes)
    return out


def layer_program(kind: str, T: int, n_seq: int, devices, topology: str):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pallas_kernels import compile_for
    from qwen35_jax.config import load_config
    from qwen35_jax.layers import MIXERS
    from qwen35_jax.sharding import make_mesh, unboxed, use_mesh

    cfg = load_config("qwen3.5-35b-a3b", max_position_embeddings=max(T, 262144))
    layer = MIXERS[kind](cfg)
    mesh = make_mesh({"sequence": n_seq}, devices[:n_seq])
    x = jax.ShapeDtypeStruct((1, T, cfg.hidden_size), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(None, "sequence" if n_seq > 1 else None)))
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=NamedSharding(mesh, P(None, "sequence" if n_seq > 1
                                                                                   else None)))
    with use_mesh(mesh), compile_for("tpu"):
        params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 256, cfg.hidden_size),
                                                                               jnp.bfloat16),
                                                   segment_ids_BT=jnp.ones((1, 256), jnp.int32),
                                                   positions_BT=jnp.zeros((1, 256), jnp.int32)))
        # weights replicated: the all-reduce of their gradients is the only parameter traffic counted
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())),
                              unboxed(params))

        def loss(p, x, seg, pos):
            y = layer.apply(p, x, segment_ids_BT=seg, positions_BT=pos)
            return jnp.sum(y.astype(jnp.float32))

        t0 = time.perf_counter()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile()
    compile_s = time.perf_counter() - t0
    layer_flops = 3 * T * (MIXERS[kind].sequence_flops(cfg, T) + 2 * MIXERS[kind].num_params(cfg))  # fwd + bwd
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    mem = compiled.memory_analysis()
    return {"kind": kind, "T": T, "sequence": n_seq, "topology": topology, "compile_s": round(compile_s, 1),
            "collectives": collective_bytes(compiled.as_text()), "model_flops_per_device": layer_flops / n_seq,
            "xla_flops_per_device": float(cost.get("flops", 0.0)), "temp_bytes": int(mem.temp_size_in_bytes)}


def comm_part(T: int, shards, topology: str) -> list[dict]:
    from qwen35_jax.train.aot import topology_devices, tpu_env

    tpu_env()
    devices = topology_devices(topology)
    rows = []
    for kind in ("gdn", "attn"):
        for n in shards:
            r = layer_program(kind, T, n, devices, topology)
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


SCALING = '''
import json, sys, time, jax, jax.numpy as jnp, numpy as np
from qwen35_jax import forward, init_params, load_config
from qwen35_jax.sharding import make_mesh, param_shardings, use_mesh
T, rounds = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config("tiny", num_experts=0, intermediate_size=256, mtp_num_layers=0, dtype="float32",
                  max_position_embeddings=T, attention_impl="xla_blocked")
params = init_params(cfg, jax.random.key(0))
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T))
seg = np.ones((1, T), np.int32); seg[0, T // 3:] = 2
loss = lambda p, t, s: jnp.mean(jnp.square(forward(cfg, p, t, segment_ids=s)))
fns = {}
for n in (1, 2, 4, 8):
    mesh = make_mesh({"sequence": n}, jax.devices()[:n])
    p = jax.device_put(params, param_shardings(cfg, mesh))
    with use_mesh(mesh):
        f = jax.jit(jax.grad(loss)).lower(p, tokens, seg).compile()
    fns[n] = (f, p)
    jax.block_until_ready(f(p, tokens, seg))
times = {n: [] for n in fns}
for _ in range(rounds):
    for n, (f, p) in fns.items():
        t0 = time.perf_counter(); jax.block_until_ready(f(p, tokens, seg)); times[n].append(time.perf_counter() - t0)
print(json.dumps({str(n): sorted(v)[len(v) // 2] for n, v in times.items()}))
'''


def scaling_part(T: int, rounds: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCALING, str(T), str(rounds)], env=env, capture_output=True,
                         text=True, timeout=3000, cwd=str(Path(__file__).resolve().parents[1]))
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=262144)
    parser.add_argument("--shards", default="4,8,16")
    parser.add_argument("--topology", default="v5p:4x4x1")
    parser.add_argument("--scaling-seq-len", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", choices=("comm", "scaling"), action="append", default=[])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result = {"environment": environment(), "load_before": os.getloadavg()}
    if "comm" not in args.skip:
        rows = comm_part(args.seq_len, [int(s) for s in args.shards.split(",")], args.topology)
        peak = PEAK_BF16[args.topology.split(":")[0]]
        table = []
        for r in rows:
            c = r["collectives"]
            act = c["collective-permute"][1] + c["all-gather"][1] + c["reduce-scatter"][1] + c["all-to-all"][1]
            secs = r["model_flops_per_device"] / peak
            table.append([r["kind"], r["sequence"], f"{c['collective-permute'][0]} / {c['collective-permute'][1] / 2**20:.1f}",
                          f"{c['all-gather'][0]} / {c['all-gather'][1] / 2**20:.1f}",
                          f"{c['reduce-scatter'][0]} / {c['reduce-scatter'][1] / 2**20:.1f}",
                          f"{c['all-reduce'][0]} / {c['all-reduce'][1] / 2**20:.1f}",
                          f"{r['model_flops_per_device'] / 1e12:.2f}", f"{r['xla_flops_per_device'] / 1e12:.2f}",
                          f"{1e3 * secs:.2f}", f"{act / secs / 1e9:.1f}", f"{r['temp_bytes'] / 2**30:.2f}"])
        print(markdown_table(["layer", "sequence N", "collective-permute n / MiB", "all-gather n / MiB",
                              "reduce-scatter n / MiB", "all-reduce (param grads) n / MiB", "model TFLOP/dev",
                              "XLA-estimate TFLOP/dev", "compute ms at peak", "break-even GB/s", "temp GiB/dev"],
                             table))
        result["comm"] = rows
    if "scaling" not in args.skip:
        times = scaling_part(args.scaling_seq_len, args.rounds)
        cores = os.cpu_count() or 1
        rows = [[n, f"{t:.3f}", f"{times[1] / t:.2f}", f"{times[1] / t / min(n, cores):.2f}"] for n, t in times.items()]
        print(markdown_table(["sequence N (fake CPU devices)", "fwd+bwd s (median)", "speedup vs N=1",
                              f"efficiency vs min(N, {cores} cores)"], rows))
        result["scaling"] = {"seq_len": args.scaling_seq_len, "median_s": times, "cores": cores}
    result["load_after"] = os.getloadavg()
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
