"""MoE decode path: one compiled cached forward of 1, 2 and 4 tokens with the routed experts through the sorted
grouped-matmul dispatch against the loop over the distinct experts (`layers/moe.py` `distinct_experts_swiglu`, the
default for a few tokens), alternating in one process.

The trained run's model (`--run`, default runs/default) or a random-init `--model` preset. The sorted variant is
traced with `moe.FEW_ROWS_MAX = 0` under a config that differs only in `moe_impl="xla"` (what "auto" resolves to
on CPU), so the two compiled programs are cached apart.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/moe_decode.py --out moe_decode.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, interleaved, markdown_table, paired_ratio, write_json  # noqa: E402
from qwen35_jax import init_params, load_config  # noqa: E402
from qwen35_jax.layers import moe  # noqa: E402
from qwen35_jax.model import forward_cached, init_cache  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--model", default="tiny", help="preset when there is no trained run")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if Path(args.run, "checkpoints").exists():
        from qwen35_jax.generate_cli import load_source

        cfg, params, _ = load_source(args.run)
    else:
        cfg = load_config(args.model)
        params = init_params(cfg, jax.random.key(0))
    cfg = cfg.replace(dtype="float32")
    if not cfg.num_experts:
        raise SystemExit(f"{cfg.name}: no routed experts")
    P = 64
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    cache = init_cache(cfg, 1, P + max(args.tokens))
    _, _, cache = jax.jit(lambda p, t, c: forward_cached(cfg, p, t, c, logits_at="last"))(params, prompt, cache)
    fns, default_rows = {}, moe.FEW_ROWS_MAX
    for path in ("sorted", "distinct"):
        moe.FEW_ROWS_MAX = 0 if path == "sorted" else default_rows
        c = cfg.replace(moe_impl="xla") if path == "sorted" else cfg
        for T in args.tokens:
            step = jax.jit(lambda p, t, k, c=c: jnp.argmax(forward_cached(c, p, t, k)[0], -1))
            compiled = step.lower(params, prompt[:, :T], cache).compile()  # traced now, under this path
            fns[(path, T)] = lambda f=compiled, t=prompt[:, :T]: f(params, t, cache)
    moe.FEW_ROWS_MAX = default_rows
    load_before = os.getloadavg()
    times = interleaved(fns, warmup=5, steps=args.steps)
    rows = []
    for T in args.tokens:
        s, g = times[("sorted", T)], times[("distinct", T)]
        rows.append({"tokens": T, "sorted ms": round(1e3 * s["median_s"], 3),
                     "distinct-expert loop ms": round(1e3 * g["median_s"], 3),
                     "speed-up": round(paired_ratio(g, s), 2)})
    print(f"{cfg.name}: {cfg.num_experts} experts, top-{cfg.experts_per_token}; load average {load_before} before, "
          f"{os.getloadavg()} after")
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.out:
        write_json(args.out, {"environment": environment(), "model": cfg.name, "rows": rows,
                              "load_avg_before": load_before, "load_avg_after": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
