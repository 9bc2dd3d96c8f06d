"""GDN_OP (benchmarks.md): the gated delta rule op on CPU, forward and forward+backward.

B=1, T=4096, H=8 (Hk = Hv), dk = dv = 64, fp32, q/k l2norm in the op. Contenders, timed in alternation:
our chunked XLA path (`impl="xla"`), our per-token recurrent scan (`impl="recurrent"`), and the peer,
`transformers` 5.23.0 `torch_chunk_gated_delta_rule` (torch CPU, 2 threads).

    .venv/bin/python benchmarks/gdn_op.py --out /tmp/gdn_op.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (add_load_arguments, environment, interleaved, load_guard, load_line,  # noqa: E402
                               machine_record, markdown_table, paired_ratio, write_json)


def jax_fns(arrays, impl, chunk_size):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule

    q, k, v, g, beta, w = (jnp.asarray(a) for a in arrays)

    def fwd(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, chunk_size=chunk_size, impl=impl)[0]

    def loss(q, k, v, g, beta):
        return jnp.sum(fwd(q, k, v, g, beta) * w)

    f = jax.jit(fwd)
    fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    return (lambda: f(q, k, v, g, beta)), (lambda: fb(q, k, v, g, beta))


def torch_fns(arrays, threads):
    import torch

    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    torch.set_num_threads(threads)
    q, k, v, g, beta, w = (torch.from_numpy(a) for a in arrays)

    def fwd():
        with torch.no_grad():
            return torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

    def fwd_bwd():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta)]
        o = torch_chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True)[0]
        loss = (o * w).sum()
        loss.backward()
        return [x.grad for x in leaves]

    return fwd, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--skip-recurrent", action="store_true", help="the per-token scan is slow to compile and run")
    ap.add_argument("--out", default="gdn_op.json")
    add_load_arguments(ap)
    args = ap.parse_args()
    guard = load_guard(args)

    import numpy as np

    B, T, H, d = 1, args.T, args.heads, args.dim
    rng = np.random.default_rng(0)
    f32 = np.float32
    arrays = (rng.normal(size=(B, T, H, d)).astype(f32), rng.normal(size=(B, T, H, d)).astype(f32),
              rng.normal(size=(B, T, H, d)).astype(f32),
              (-np.exp(rng.normal(size=(B, T, H)) - 2.0)).astype(f32),     # log decay, typical magnitude
              (1 / (1 + np.exp(-rng.normal(size=(B, T, H))))).astype(f32),
              rng.normal(size=(B, T, H, d)).astype(f32))                  # cotangent weights of the loss

    contenders = {"xla": jax_fns(arrays, "xla", args.chunk_size), "transformers": torch_fns(arrays, args.torch_threads)}
    if not args.skip_recurrent:
        contenders["recurrent"] = jax_fns(arrays, "recurrent", args.chunk_size)

    results = {}
    for mode, idx in (("fwd", 0), ("fwd+bwd", 1)):
        results[mode] = interleaved({name: fns[idx] for name, fns in contenders.items()}, warmup=2, steps=args.steps)

    rows = []
    for mode, r in results.items():
        peer = r["transformers"]
        for name, t in r.items():
            rows.append([mode, name, t["median_s"] * 1e3, paired_ratio(t, peer)])
    print(f"\nGDN_OP: B={B} T={T} H={H} dk=dv={d} fp32 l2norm, chunk {args.chunk_size}; "
          f"torch threads {args.torch_threads}, cpu_count {os.cpu_count()}")
    print(markdown_table(["mode", "impl", "median ms", "x faster than transformers"], rows))
    print(load_line(guard))
    write_json(args.out, {"benchmark": "GDN_OP", "shape": {"B": B, "T": T, "H": H, "dk": d, "dv": d},
                          "chunk_size": args.chunk_size, "results": results,
                          "speedup_vs_transformers": {mode: {n: paired_ratio(t, r["transformers"]) for n, t in r.items()}
                                                      for mode, r in results.items()},
                          "env": environment(), "machine": machine_record(guard)})


if __name__ == "__main__":
    main()
