"""Compile time of the training computation at 8 vs 48 layers (issue 2: the 48/8 ratio should be at most 1.5).

For each depth and for `scan_layers` true (the layer stack is one `lax.scan` over the repeating group) and false
(the same scan fully unrolled, the contrast), this lowers and compiles `jax.value_and_grad` of the mean next-token
cross-entropy with `jax.jit(...).lower(...).compile()`, timing lowering (trace + StableHLO) and XLA compilation
separately. Parameters are abstract (`jax.eval_shape`), so deep models cost no memory. Every repeat traces a fresh
function after `jax.clear_caches()`, so nothing is reused between repeats.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/compile_time.py --out compile_time.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, markdown_table, write_json  # noqa: E402
from qwen35_jax import forward, init_params, load_config  # noqa: E402


def make_loss(cfg):
    """Mean next-token cross-entropy of `tokens [B, T]` (fp32)."""
    def loss_fn(params, tokens_BT):
        logits_BTV = forward(cfg, params, tokens_BT[:, :-1])
        lse = jax.nn.logsumexp(logits_BTV, axis=-1)
        target = jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(lse - target)
    return loss_fn


def compile_once(cfg, batch: int, seq: int) -> dict:
    """{"lower_s", "compile_s", "total_s", "total_cpu_s"} for a fresh jit of value_and_grad(loss).

    `total_cpu_s` is this process's CPU time over lowering + compilation: on a shared, loaded machine it is the
    steadier measure (wall time also counts the time other processes held the cores).
    """
    jax.clear_caches()
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    step = jax.jit(jax.value_and_grad(make_loss(cfg)))
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = step.lower(params, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    c2, t2 = time.process_time(), time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "total_cpu_s": c2 - c0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-small", help="model preset (default: bench-small, BENCH_SMALL)")
    ap.add_argument("--layers", default="8,48", help="two depths, shallow,deep (multiples of the pattern period)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128, help="sequence length (compile time hardly depends on it)")
    ap.add_argument("--repeats", type=int, default=2, help="compiles per scanned configuration; median reported")
    ap.add_argument("--unrolled-repeats", type=int, default=1,
                    help="compiles per unrolled configuration (the 48-layer unrolled compile alone takes minutes)")
    ap.add_argument("--no-unrolled", action="store_true", help="skip the scan_layers=False contrast")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    shallow, deep = (int(x) for x in args.layers.split(","))
    modes = [True] if args.no_unrolled else [True, False]
    results = []
    for scan in modes:
        for layers in (shallow, deep):
            cfg = load_config(args.model, num_layers=layers, scan_layers=scan)
            repeats = args.repeats if scan else args.unrolled_repeats
            runs = [compile_once(cfg, args.batch, args.seq) for _ in range(repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results.append({"scan_layers": scan, "num_layers": layers, **med, "runs": runs})
            print(f"scan_layers={scan} layers={layers}: lower {med['lower_s']:.2f}s compile {med['compile_s']:.2f}s",
                  flush=True)

    rows, ratios, cpu_ratios = [], {}, {}
    for scan in modes:
        by = {r["num_layers"]: r for r in results if r["scan_layers"] == scan}
        key = "scan" if scan else "unrolled"
        ratios[key] = by[deep]["total_s"] / by[shallow]["total_s"]
        cpu_ratios[key] = by[deep]["total_cpu_s"] / by[shallow]["total_cpu_s"]
        for layers in (shallow, deep):
            r = by[layers]
            last = layers == deep
            rows.append([f"scan_layers={scan}", layers, r["lower_s"], r["compile_s"], r["total_s"], r["total_cpu_s"],
                         f"{ratios[key]:.2f}" if last else "", f"{cpu_ratios[key]:.2f}" if last else ""])
    print()
    print(f"Compile time of jit(value_and_grad(mean CE)), model {args.model}, tokens [{args.batch}, {args.seq}], "
          f"median of {args.repeats} (scan) / {args.unrolled_repeats} (unrolled) compiles, seconds")
    print()
    print(markdown_table(["stack", "layers", "lower s", "compile s", "total s", "total CPU s",
                          f"wall {deep}/{shallow}", f"CPU {deep}/{shallow}"], rows))
    goal = ratios["scan"] <= 1.5
    print(f"\nscan {deep}/{shallow} ratio {ratios['scan']:.2f} wall, {cpu_ratios['scan']:.2f} CPU "
          f"(goal <= 1.5: {'met' if goal else 'NOT met'})")
    if args.out:
        write_json(args.out, {"benchmark": "compile_time", "model": args.model, "batch": args.batch,
                              "seq": args.seq, "repeats": args.repeats,
                              "unrolled_repeats": args.unrolled_repeats, "results": results, "ratios": ratios,
                              "cpu_ratios": cpu_ratios,
                              "goal_ratio": 1.5, "goal_met": goal, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
