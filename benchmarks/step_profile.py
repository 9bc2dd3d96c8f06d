"""Where the CPU training step's time goes, read off the compiled program (issue 14).

Compiles BENCH_SMALL's training step (the same loss and AdamW as `bench_small.py`), runs it under `jax.profiler`
with a Perfetto trace, and charges every executed XLA CPU op (a fusion, dot, copy, loop: one thunk) to the model
component its HLO `op_name` metadata names: the Gated DeltaNet mixers (projections and elementwise work, the
chunk-state scan), the attention mixer, the MoE block (grouped matmuls, routing and dispatch, shared expert), norms,
the LM head + loss, the optimizer; forward and backward apart. Prints a table (ms per step, share) and the ops that
cost most, and writes JSON with `--out`. Self times of ops: concurrent thunks can add up to more than the wall time.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/step_profile.py [--model bench-small] [--steps 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_small import adamw, make_loss, train_step_fn  # noqa: E402
from benchmarks.common import (add_load_arguments, environment, load_guard, load_line, machine_record,  # noqa: E402
                               markdown_table, median_time, write_json)
from qwen35_jax import init_params, load_config  # noqa: E402
from qwen35_jax.schema import parse_overrides  # noqa: E402

RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "$")


def component(op_name: str, layer_kinds) -> tuple[str, str]:
    """(component, "fwd"/"bwd") of one HLO op from its `op_name` metadata."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    m = re.search(r"layers/block_(\d+)/(?:[^/]*/)*?(mixer|ffn|input_norm|post_norm)(/.*)?$", op_name)
    if m:
        mixer_kind = layer_kinds[int(m.group(1)) % len(layer_kinds)][0]
        part, rest = m.group(2), m.group(3) or ""
        if part == "mixer":
            if mixer_kind != "attn":
                return ("GDN chunk-state scan" if rest.startswith("/while") else "GDN other (projections, "
                        "conv, gates, intra-chunk WY, norm)"), direction
            return "attention", direction
        if part == "ffn":
            if "gmm" in rest:
                return "MoE grouped matmuls", direction
            if "shared_expert" in rest:
                return "MoE shared expert", direction
            return "MoE routing, dispatch, combine", direction
        return "norms", direction
    if "mtp" in op_name:
        return "MTP block", direction
    if "logits" in op_name or "jvp()" in op_name:
        return "LM head + loss", direction
    if "embed_tokens" in op_name:
        return "embedding", direction
    if "jvp(" not in op_name and "transpose(" not in op_name and op_name:
        return "optimizer", "-"
    return "other", direction


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after 3 untimed and 5 timed ones)")
    ap.add_argument("--top", type=int, default=15, help="list this many of the costliest ops")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="model config overrides, key=value")
    add_load_arguments(ap)
    args = ap.parse_args(argv)
    guard = load_guard(args)

    overrides = parse_overrides(args.overrides)
    cfg = load_config(args.model, **overrides)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq),
                                                           dtype=np.int32))
    opt = adamw()
    fn = train_step_fn(make_loss(cfg, True), opt)
    state = {"params": params, "opt": opt.init(params)}
    compiled = fn.lower(state["params"], state["opt"], tokens).compile()
    op_names = {m.group(1): m.group(2) for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"',
                                                            compiled.as_text(), re.M)}

    def step():
        state["params"], state["opt"], loss = fn(state["params"], state["opt"], tokens)
        return loss

    wall_ms = 1e3 * median_time(step, warmup=3, steps=5)["median_s"]
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            step().block_until_ready()
        jax.profiler.stop_trace()
        events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events

    kinds = cfg.layer_kinds
    per = collections.Counter()
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(RUNTIME_EVENTS):
            continue
        name = op_names.get(e["name"], "")
        per[component(name, kinds)] += e["dur"] / 1e3 / args.steps
        per_op[(e["name"], name)] += e["dur"] / 1e3 / args.steps
    total = sum(per.values())
    rows, by_component = [], {}
    for comp in sorted({c for c, _ in per}, key=lambda c: -sum(v for (k, _), v in per.items() if k == c)):
        fwd, bwd, other = per[(comp, "fwd")], per[(comp, "bwd")], per[(comp, "-")]
        both = fwd + bwd + other
        by_component[comp] = {"fwd_ms": fwd, "bwd_ms": bwd + other, "share": both / total}
        rows.append([comp, f"{fwd:.1f}", f"{bwd + other:.1f}", f"{both:.1f}", f"{100 * both / total:.1f}%"])
    print(f"\nstep_profile: {args.model} {overrides or ''}, batch {args.batch} x {args.seq}, fp32 train step "
          f"(CE + router aux, AdamW); wall {wall_ms:.0f} ms per step (median of 5); op self times summed over "
          f"{args.steps} traced steps: {total:.0f} ms per step\n")
    print(markdown_table(["component", "fwd ms", "bwd ms", "total ms", "share"], rows))
    print("\ncostliest ops (ms per step):\n")
    top = [[f"{v:.2f}", n, o.split("/")[-1][:60] or "-"] for (n, o), v in per_op.most_common(args.top)]
    print(markdown_table(["ms", "op", "from"], top))
    print(load_line(guard))
    if args.out:
        write_json(args.out, {"benchmark": "step_profile", "model": args.model, "overrides": overrides,
                              "batch": args.batch, "seq": args.seq, "wall_ms": wall_ms, "op_ms": total,
                              "components": by_component, "environment": environment(),
                              "machine": machine_record(guard)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
