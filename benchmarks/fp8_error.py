"""FP8 error of the scaling choices and of the two FP8 grouped-matmul paths, against float64 (CPU; numbers, no speed).

1. Dense projection `x [M, K] @ w [K, N]` through qwix's quantized-training dot_general (the path
   `precision: fp8` uses) with per-tensor, per-channel and per-block (128) current scaling, on activations with
   outlier channels (a few channels 50x larger, as trained LLM activations have) and on plain Gaussian ones:
   relative Frobenius error of the output and of both gradients, plus the bytes of scales per step.
2. Routed experts `gmm(x [M, K], w [G, K, N])` with experts of different magnitudes (log-spaced over 10^+-1.5 and
   10^+-4): this package's `gmm_fp8` (per-expert column scales) vs qwix's `ragged_dot_qt` (one column scale shared by
   all experts), bf16 for scale.

`python benchmarks/fp8_error.py --out benchmarks/results/fp8_error.json`
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gmm import gmm_fp8

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def rel(a, b):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dense_errors(x, w, dy, scaling):
    from qwix._src.core import dot_general_qt

    cw = scaling != "per_tensor"
    tile = 128 if scaling == "per_block" else None
    cfg = dot_general_qt.DotGeneralQtConfig(
        lhs_qtype=E4M3, rhs_qtype=E4M3, tile_size=tile, lhs_calibration_method="absmax",
        rhs_calibration_method="absmax", lhs_disable_channelwise_axes=not cw, rhs_disable_channelwise_axes=not cw,
        dlhs_grad_qtype=E5M2, dlhs_grad_calibration_method="absmax", dlhs_grad_disable_channelwise_axes=not cw,
        drhs_grad_qtype=E5M2, drhs_grad_calibration_method="absmax", drhs_grad_disable_channelwise_axes=not cw,
        dlhs_tile_size=tile, drhs_tile_size=tile)
    dn = (((1,), (0,)), ((), ()))

    def f(a, b):
        return dot_general_qt.dot_general_qt(a, b, dn, cfg)

    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    return y, dx, dw


def bf16_errors(x, w, dy):
    f = lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)  # noqa
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    return (y,) + vjp(jnp.asarray(dy))


def dense_table(M=512, K=1024, N=512):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    dy = (rng.standard_normal((M, N)) * 1e-3).astype(np.float32)
    rows = []
    for data in ("gaussian", "outlier channels"):
        x = rng.standard_normal((M, K)).astype(np.float32)
        if data != "gaussian":
            x[:, rng.choice(K, 8, replace=False)] *= 50.0
        x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
        ref = (x64 @ w64, dy64 @ w64.T, x64.T @ dy64)
        for name in ("bf16", "per_tensor", "per_channel", "per_block"):
            out = bf16_errors(x, w, dy) if name == "bf16" else dense_errors(x, w, dy, name)
            scale_bytes = {"bf16": 0, "per_tensor": 3 * 2 * 4, "per_channel": 4 * (M + N) + 4 * (M + K) + 4 * (K + N),
                           "per_block": 4 * (M + N) * K // 128 + 4 * (M + K) * N // 128 + 4 * (K + N) * M // 128}
            rows.append({"data": data, "scaling": name, "y": rel(out[0], ref[0]), "dx": rel(out[1], ref[1]),
                         "dw": rel(out[2], ref[2]), "scale_bytes": scale_bytes[name]})
    return rows


def gmm_table(spread, M=1024, K=256, N=256, G=8):
    from qwix._src.core import ragged_dot_qt

    rng = np.random.default_rng(1)
    sizes = rng.multinomial(M, np.ones(G) / G).astype(np.int32)
    mags = 10.0 ** np.linspace(-spread, spread, G)  # experts of different magnitudes
    w = (rng.standard_normal((G, K, N)) * 0.02 * mags[:, None, None]).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    dy = (rng.standard_normal((M, N)) * 1e-3).astype(np.float32)
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    y64, dx64, dw64 = np.zeros((M, N)), np.zeros((M, K)), np.zeros((G, K, N))
    start = 0
    for g, n in enumerate(sizes):
        sl = slice(start, start + n)
        y64[sl], dx64[sl], dw64[g] = x64[sl] @ w64[g], dy64[sl] @ w64[g].T, x64[sl].T @ dy64[sl]
        start += n
    gs = jnp.asarray(sizes)
    cfg = ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=E4M3, rhs_qtype=E4M3, dlhs_grad_qtype=E5M2, drhs_grad_qtype=E5M2)
    paths = {
        "gmm_fp8 (per-expert column scales)": lambda a, b: gmm_fp8(a, b, gs, impl="xla",
                                                                   preferred_element_type=jnp.float32),
        "qwix ragged_dot_qt (shared column scales)": lambda a, b: ragged_dot_qt.ragged_dot_qt(
            a, b, gs, cfg, None, jnp.float32),
        "bf16 ragged_dot": lambda a, b: jax.lax.ragged_dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), gs,
                                                            preferred_element_type=jnp.float32),
    }
    rows = []
    for name, f in paths.items():
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(dy))
        per_expert = [rel(y[s:s + n], y64[s:s + n]) for s, n in zip(np.cumsum(sizes) - sizes, sizes) if n]
        rows.append({"path": name, "expert_spread": f"10^[-{spread}, {spread}]", "y": rel(y, y64), "y_worst_expert": max(per_expert), "dx": rel(dx, dx64),
                     "dw": rel(dw, dw64)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/fp8_error.json")
    args = parser.parse_args()
    dense, grouped = dense_table(), gmm_table(1.5) + gmm_table(4.0)
    print("Dense projection [512, 1024] x [1024, 512], relative error vs float64 (e4m3 fwd, e5m2 grads)\n")
    print("| activations | scaling | y | dx | dw | scale bytes |\n| --- | --- | --- | --- | --- | --- |")
    for r in dense:
        print(f"| {r['data']} | {r['scaling']} | {r['y']:.2e} | {r['dx']:.2e} | {r['dw']:.2e} | {r['scale_bytes']:,} |")
    print("\nRouted experts [1024, 256] x [8, 256, 256], expert weight magnitudes log-spaced, relative error vs float64\n")
    print("| expert magnitudes | path | y | y, worst expert | dx | dw |\n| --- | --- | --- | --- | --- | --- |")
    for r in grouped:
        print(f"| {r['expert_spread']} | {r['path']} | {r['y']:.2e} | {r['y_worst_expert']:.2e} | {r['dx']:.2e} "
              f"| {r['dw']:.2e} |")
    with open(args.out, "w") as f:
        json.dump({"dense": dense, "grouped": grouped}, f, indent=1)


if __name__ == "__main__":
    main()
