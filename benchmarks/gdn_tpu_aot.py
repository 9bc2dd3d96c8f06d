"""The Pallas gated delta rule compiled for real TPU generations on this CPU host (libtpu, no TPU needed).

For the Qwen3.5-397B (16 key / 64 value heads) and Qwen3-Next (16 / 32) GDN shapes, d = 128, bf16 inputs, B = 1 and
T in {4096, 32768}, on v5e, v5p and v6e: compile time, XLA's per-device memory, the kernels' FLOPs and HBM bytes
per token (the kernels' own cost model, `pallas_tpu.kernel_cost`), the forward's HBM traffic against the fused
minimum of kernels.md (bf16 q, k, v, o, fp32 g, bf16 beta read or written once: the goal is within 1.5x), and
roofline times: the memory floor (bytes / HBM bandwidth) and the MXU time of the kernels' products with bf16 inputs
(mxu="auto" -> bf16: one pass each, except the triangular inverse at three bf16 passes, bf16x3).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gdn_tpu_aot.py --out benchmarks/results/gdn_tpu_aot.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_json  # noqa: E402

# per chip: bf16 MXU peak (FLOP/s) and HBM bandwidth (B/s), kernels.md (v5p: 2 cores a chip)
CHIPS = {"v5e": (197e12, 820e9, "v5e:2x2"), "v5p": (459e12, 2.46e12, "v5p:2x2x1"), "v6e": (920e12, 1.64e12, "v6e:2x2")}
SHAPES = {"qwen3.5-397b": (16, 64), "qwen3-next": (16, 32)}
INVERSE_PASSES = 3  # the inverse's products in bf16 mode: bf16x3


def fused_minimum_bytes(Hk, Hv, d):
    """Per token: bf16 q, k (Hk heads), v, o (Hv heads), fp32 g, bf16 beta, each touched once."""
    return 2 * Hk * d * 2 + 2 * Hv * d * 2 + Hv * (4 + 2)


def compile_one(devices, Hk, Hv, T, d=128):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule

    one = jax.sharding.SingleDeviceSharding(devices[0])
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    args = (spec((1, T, Hk, d), jnp.bfloat16), spec((1, T, Hk, d), jnp.bfloat16), spec((1, T, Hv, d), jnp.bfloat16),
            spec((1, T, Hv), jnp.float32), spec((1, T, Hv), jnp.bfloat16))

    def fwd(*a):
        return chunk_gated_delta_rule(*a, use_qk_l2norm=True, impl="pallas", interpret=False)[0]

    def bwd(*a):
        return jax.grad(lambda *b: jnp.sum(fwd(*b).astype(jnp.float32)), argnums=range(5))(*a)

    out = {}
    for name, f in (("fwd", fwd), ("fwd+bwd", bwd)):
        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        mem = compiled.memory_analysis()
        out[name] = {"compile_s": time.perf_counter() - t0,
                     "device_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes,
                     "temp_bytes": mem.temp_size_in_bytes}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", nargs="*", default=list(CHIPS))
    parser.add_argument("--seq", nargs="*", type=int, default=[4096, 32768])
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    from pallas_kernels.gated_delta_rule.pallas_tpu import kernel_cost
    from qwen35_jax.train.aot import topology_devices, tpu_env

    tpu_env()
    rows, results = [], []
    for chip in args.chips:
        peak, bw, topology = CHIPS[chip]
        devices = topology_devices(topology)
        for shape, (Hk, Hv) in SHAPES.items():
            for T in args.seq:
                compiled = compile_one(devices, Hk, Hv, T)
                fc, bc = (kernel_cost(1, T, Hk, Hv, 128, 128, backward=b) for b in (False, True))
                f_flops, f_bytes, b_flops, b_bytes = fc["flops"], fc["bytes"], bc["flops"], bc["bytes"]
                mxu_s = lambda c: (c["flops"] + (INVERSE_PASSES - 1) * c["inverse_flops"]) / peak  # noqa: E731
                minimum = fused_minimum_bytes(Hk, Hv, 128) * T
                rec = {"chip": chip, "shape": shape, "T": T, "Hk": Hk, "Hv": Hv, "compiled": compiled,
                       "fwd_flops_per_token": f_flops / T, "fwd_bytes_per_token": f_bytes / T,
                       "bwd_flops_per_token": b_flops / T, "bwd_bytes_per_token": b_bytes / T,
                       "fused_min_bytes_per_token": minimum / T, "fwd_bytes_vs_min": f_bytes / minimum,
                       "fwd_memory_floor_ms": 1e3 * f_bytes / bw,
                       "fwd_mxu_ms": 1e3 * mxu_s(fc),
                       "bwd_memory_floor_ms": 1e3 * b_bytes / bw,
                       "bwd_mxu_ms": 1e3 * mxu_s(bc)}
                results.append(rec)
                c_fwd, c_bwd = compiled["fwd"], compiled["fwd+bwd"]
                rows.append([chip, shape, T, f"{c_fwd['compile_s']:.1f} / {c_bwd['compile_s']:.1f}",
                             f"{c_fwd['device_bytes'] / 2**20:.0f} / {c_bwd['device_bytes'] / 2**20:.0f}",
                             f"{f_flops / T / 1e3:.0f} / {b_flops / T / 1e3:.0f}",
                             f"{f_bytes / T / 1e3:.1f} / {b_bytes / T / 1e3:.1f}",
                             f"{f_bytes / minimum:.2f}",
                             f"{rec['fwd_memory_floor_ms']:.2f} / {rec['fwd_mxu_ms']:.2f}",
                             f"{rec['bwd_memory_floor_ms']:.2f} / {rec['bwd_mxu_ms']:.2f}"])
                print(rows[-1], flush=True)
    print(markdown_table(["chip", "shape", "T", "compile s fwd / fwd+bwd", "MiB/device fwd / fwd+bwd",
                          "kFLOP/token fwd / bwd", "KB/token fwd / bwd", "fwd bytes vs fused min",
                          "fwd ms: HBM floor / MXU", "bwd ms: HBM floor / MXU"], rows))
    if args.out:
        write_json(args.out, {"benchmark": "gdn_tpu_aot", "environment": environment(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
