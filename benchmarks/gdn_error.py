"""Error of every gated-delta-rule implementation against a float64 recurrence, at fp32 and bf16 inputs.

B=1, T=512, 2 key / 4 value heads, dk = dv = 64, chunk 64, q/k l2norm, three packed documents, g ~ -|N(0, 1)|.
Reports max |x - x64| / max |x64| for the output, the final state and the gradients of a random projection of both.
Pallas runs in interpret mode here: its numerics are the TPU kernel's (fp32 VPU math; the MXU modes are emulated
by explicit bf16 casts).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gdn_error.py --out benchmarks/results/gdn_error.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_json  # noqa: E402

NAMES = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dS0")


def inputs(B=1, T=512, Hk=2, Hv=4, d=64, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(B, T, Hk, d)), rng.normal(size=(B, T, Hk, d))
    v = rng.normal(size=(B, T, Hv, d))
    g = -np.abs(rng.normal(size=(B, T, Hv)))
    beta = 1 / (1 + np.exp(-rng.normal(size=(B, T, Hv))))
    S0 = rng.normal(size=(B, Hv, d, d)) * 0.3
    seg = np.ones((B, T), np.int32)
    seg[:, 100:] = 2
    seg[:, 333:] = 3
    w_o, w_s = rng.normal(size=v.shape), rng.normal(size=S0.shape)
    return (q, k, v, g, beta, S0), seg, w_o, w_s


def run(fn, dtype, args, seg, w_o, w_s):
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, g, beta, S0):
        o, s = fn(q, k, v, g, beta, initial_state=S0, segment_ids=seg, use_qk_l2norm=True, output_final_state=True)
        return jnp.sum(o.astype(s.dtype) * w_o) + jnp.sum(s * w_s), (o, s)

    cast = [jnp.asarray(a, dtype) for a in args[:3]] + [jnp.asarray(args[3], jnp.promote_types(dtype, jnp.float32)),
                                                         jnp.asarray(args[4], dtype),
                                                         jnp.asarray(args[5], jnp.promote_types(dtype, jnp.float32))]
    grads, (o, s) = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(*cast)
    return [np.asarray(x, np.float64) for x in (o, s, *grads)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
    from pallas_kernels.gated_delta_rule.pallas_tpu import pallas_gated_delta_rule

    data, seg, w_o, w_s = inputs()
    with jax.enable_x64(True):
        want = run(recurrent_gated_delta_rule, jnp.float64, data, seg, w_o, w_s)
    contenders = {
        "xla": functools.partial(chunk_gated_delta_rule, impl="xla"),
        "pallas, mxu f32": functools.partial(pallas_gated_delta_rule, mxu="f32"),
        "pallas, mxu bf16": functools.partial(pallas_gated_delta_rule, mxu="bf16"),
        "recurrent": recurrent_gated_delta_rule,
    }
    rows, results = [], []
    for dtype_name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        for name, fn in contenders.items():
            got = run(fn, dtype, data, seg, w_o, w_s)
            errs = {n: float(np.abs(a - b).max() / np.abs(b).max()) for n, a, b in zip(NAMES, got, want)}
            results.append({"inputs": dtype_name, "impl": name, "rel_err": errs})
            rows.append([dtype_name, name] + [f"{errs[n]:.1e}" for n in NAMES])
            print(rows[-1], flush=True)
    print(markdown_table(["inputs", "impl"] + list(NAMES), rows))
    if args.out:
        write_json(args.out, {"benchmark": "gdn_error", "environment": environment(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
