"""MQAR cell throughput: training tokens per second of the lab's MQAR loop as the first recorded sweep ran it (one
compiled call per optimizer step, the layers scanned; `--sweep`, default mqar_4layer) against `LOG_EVERY` steps per
compiled call (`lax.scan`), with the layers scanned and unrolled (`scan_layers: false`, the MQAR sweeps' setting
now), at the recorded batch and at larger batches, and against the cell of the same mixer in the current recorded
sweep (`--cell-sweep`, default mqar: zoology's gated conv + one mixer layer, so a different, smaller model; its row
says so), alternating in one process. Pinned to one core (as one `--shard` job of a sweep runs).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/mqar_throughput.py --cores 1 \
        --out benchmarks/results/mqar_throughput.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import (add_load_arguments, environment, interleaved, load_guard, load_line,  # noqa: E402
                               machine_record, markdown_table, paired_ratio, write_json)
from experiments.mqar import mqar  # noqa: E402
from experiments.mqar_train import LOG_EVERY, programs  # noqa: E402
from experiments.sweep import load_sweep  # noqa: E402
from qwen35_jax.layers import letter_of  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="mqar_4layer", help="the sweep whose model and recorded batch are measured")
    parser.add_argument("--cell-sweep", default="mqar", help="the current recorded sweep, whose cell is also timed "
                        "('' to skip)")
    parser.add_argument("--variants", nargs="+", default=["softmax", "gdn", "hybrid"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[64], help="larger batches to measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    guard = load_guard(args)
    sweep = load_sweep(args.sweep)
    cells = load_sweep(args.cell_sweep) if args.cell_sweep else None
    rows, results = [], {}
    for variant in args.variants:
        run = next(r for r in sweep.runs if r.variant == variant and r.seq_len == args.seq_len)
        s = run.spec["settings"]
        B0, K, T = s["batch_size"], LOG_EVERY, args.seq_len
        data = mqar(max(args.batches + [B0]) * K, T, vocab_size=s["vocab_size"], num_kv_pairs=s["num_kv_pairs"])
        lr = jnp.asarray(run.lr, jnp.float32)
        states = {}

        def contender(name, B, k, scan_layers, model=None):
            model = (model or run.model).replace(scan_layers=scan_layers)
            init, steps_fn, _ = programs(model, s["steps"], s["warmup_steps"], s["weight_decay"], s["clip_norm"],
                                         s["lr_schedule"])
            states[name] = init(jax.random.key(0))
            chunks = [{n: jnp.asarray(v[i * k * B:(i + 1) * k * B].reshape(k, B, T)) for n, v in data.items()}
                      for i in range(K // k)]

            def call():  # K optimizer steps of batch B, in K / k compiled calls
                for chunk in chunks:
                    states[name], losses = steps_fn(states[name], chunk, lr)
                return losses
            return call, K * B * T

        fns, tokens = {}, {}
        base = f"recorded: per-step, layer scan, B={B0}"
        for name, B, k, scan_layers in [(base, B0, 1, True), (f"scan{K} steps, layer scan, B={B0}", B0, K, True),
                                        (f"scan{K} steps, unrolled, B={B0}", B0, K, False)] + [
                (f"scan{K} steps, unrolled, B={B}", B, K, False) for B in args.batches]:
            fns[name], tokens[name] = contender(name, B, k, scan_layers)
        cell = next((r for r in cells.runs if r.variant == variant and r.seq_len == T), None) if cells else None
        if cell is not None:  # the same loop on the current sweep's model of this mixer (same T, batch, schedule)
            pattern = "".join(letter_of(m) for m in cell.model.layer_pattern)
            name = f"{args.cell_sweep} sweep's cell ({pattern}), scan{K} steps, B={cell.spec['settings']['batch_size']}"
            fns[name], tokens[name] = contender(name, cell.spec["settings"]["batch_size"], K,
                                                cell.model.scan_layers, cell.model)
        timed = interleaved(fns, warmup=1, steps=args.rounds)
        for name, r in timed.items():
            per_token = {n: [t / tokens[n] for t in timed[n]["times_s"]] for n in (name, base)}
            ratio = paired_ratio({"times_s": per_token[name]}, {"times_s": per_token[base]})
            tps = tokens[name] / r["median_s"]
            rows.append([variant, T, name, round(tps), round(tokens[name] / r["median_cpu_s"]), round(ratio, 2)])
            results[f"{variant}/{name}"] = {**r, "tokens": tokens[name], "tokens_per_s": tps, "speedup": ratio}
        print(markdown_table(["variant", "T", "loop", "tokens/s", "tokens per CPU s", "x recorded"], rows[-len(fns):]),
              flush=True)
    table = markdown_table(["variant", "T", "loop", "tokens/s", "tokens per CPU s", "x recorded"], rows)
    print(f"\n{table}\n{load_line(guard)}")
    if args.out:
        write_json(args.out, {"environment": environment(), "machine": machine_record(guard),
                              "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
