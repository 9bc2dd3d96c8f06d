"""Grouped matmul benchmark.

CPU (default): `pallas_kernels.gmm.gmm` (impl="xla") against `jax.lax.ragged_dot` (the named peer) and a dense
one-hot einsum, at fixed M and G = 16, 64, 512, forward and forward+backward; medians after a warm-up; prints a
table of ratios and writes JSON (`--out`).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gmm_bench.py --out gmm_bench.json

--aot: compiles the Pallas gmm (forward) and tgmm for TPU v5e, v5p and v6e from this host (libtpu) at the
Qwen3.5-397B expert shape and prints memory_analysis / cost_analysis.
"""

import argparse
import json
import time

import numpy as np

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import gmm, tgmm


def ragged_dot(x, w, gs):
    return jax.lax.ragged_dot(x, w, gs)


def one_hot_einsum(x, w, gs):
    gid = jnp.repeat(jnp.arange(w.shape[0]), gs, total_repeat_length=x.shape[0])
    return jnp.einsum("mg,mk,gkn->mn", jax.nn.one_hot(gid, w.shape[0], dtype=x.dtype), x, w)


def gmm_xla(x, w, gs):
    return gmm(x, w, gs, impl="xla")


METHODS = {"gmm_xla": gmm_xla, "ragged_dot": ragged_dot, "one_hot_einsum": one_hot_einsum}


def _fwd_bwd(f):
    def loss(x, w, gs):
        return jnp.sum(f(x, w, gs) ** 2)

    return jax.grad(loss, argnums=(0, 1))


def _median_ms(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def run_cpu(args):
    rng = np.random.default_rng(0)
    m, k, n = args.m, args.k, args.n
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    results = []
    for g in args.groups:
        # Router-like imbalance: Dirichlet shares, so some groups are empty and some several times the mean.
        gs = jnp.asarray(rng.multinomial(m, rng.dirichlet(np.ones(g))), jnp.int32)
        w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32)
        ref = np.asarray(jax.jit(gmm_xla)(x, w, gs))
        for name in args.methods:
            f = METHODS[name]
            err = float(np.abs(np.asarray(jax.jit(f)(x, w, gs)) - ref).max())
            for mode, fn in (("fwd", jax.jit(f)), ("fwd+bwd", jax.jit(_fwd_bwd(f)))):
                ms = _median_ms(fn, (x, w, gs), args.reps)
                results.append(dict(method=name, G=g, mode=mode, ms=ms, max_abs_diff_vs_gmm=err))
                print(f"G={g:4d} {mode:8s} {name:15s} {ms:10.2f} ms", flush=True)
    if set(args.methods) == set(METHODS):
        _print_table(results, args.groups)
    return dict(device=jax.devices()[0].device_kind, M=m, K=k, N=n, dtype="float32", reps=args.reps, results=results)


def _print_table(results, groups):
    ms = {(r["method"], r["G"], r["mode"]): r["ms"] for r in results}
    print(f"\nms (median), ratio = peer / gmm_xla (higher: gmm faster); flatness = gmm ms / gmm ms at G={groups[0]}")
    print(f"{'mode':8s} {'G':>4s} {'gmm_xla':>9s} {'ragged_dot':>11s} {'x':>7s} {'one_hot':>9s} {'x':>7s} {'flat':>6s}")
    for mode in ("fwd", "fwd+bwd"):
        for g in groups:
            ours = ms[("gmm_xla", g, mode)]
            rd, oh = ms[("ragged_dot", g, mode)], ms[("one_hot_einsum", g, mode)]
            flat = ours / ms[("gmm_xla", groups[0], mode)]
            print(f"{mode:8s} {g:4d} {ours:9.2f} {rd:11.2f} {rd / ours:7.1f} {oh:9.2f} {oh / ours:7.1f} {flat:6.2f}")


TOPOLOGIES = {  # name: (topology_name, chips_per_host_bounds)
    "v5e": ("v5e:2x2", (2, 2, 1)),
    "v5p": ("v5p:2x2x1", (2, 2, 1)),
    "v6e": ("v6e:2x2", (2, 2, 1)),
}


def run_aot(args):
    from jax.experimental import topologies

    rows, hidden, inter, experts = args.aot_rows, 4096, 1024, 512
    report = {}
    for chip, (name, bounds) in TOPOLOGIES.items():
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name="default", chips_per_host_bounds=bounds,
            num_slices=1,
        )
        one = jax.sharding.SingleDeviceSharding(topo.devices[0])
        spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=one)  # noqa: E731
        x, w, gs = spec((rows, hidden)), spec((experts, hidden, inter)), spec((experts,), jnp.int32)
        dy = spec((rows, inter))
        kernels = {
            "gmm [M,4096]x[512,4096,1024]": (
                lambda x, w, gs: gmm(x, w, gs, impl="pallas", interpret=False), (x, w, gs)
            ),
            "tgmm [M,4096]^T[M,1024]": (lambda x, dy, gs: tgmm(x, dy, gs, impl="pallas", interpret=False), (x, dy, gs)),
        }
        for label, (f, f_args) in kernels.items():
            t = time.perf_counter()
            compiled = jax.jit(f).lower(*f_args).compile()
            secs = time.perf_counter() - t
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            entry = dict(
                compile_s=round(secs, 2),
                argument_bytes=mem.argument_size_in_bytes,
                output_bytes=mem.output_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes,
                flops=float(cost.get("flops", -1)),
                bytes_accessed=float(cost.get("bytes accessed", -1)),
            )
            report[f"{chip} {label}"] = entry
            print(f"{chip} M={rows} {label}: {entry}", flush=True)
    return dict(M=rows, aot=report)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 64, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--aot", action="store_true", help="compile the Pallas kernels for TPU instead")
    parser.add_argument("--aot-rows", type=int, default=8192, help="routed rows M for --aot")
    parser.add_argument("--out", default="gmm_bench.json")
    args = parser.parse_args()
    result = run_aot(args) if args.aot else run_cpu(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
