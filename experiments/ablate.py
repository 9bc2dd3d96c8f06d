"""`qwen35 ablate CONFIG [key=value ...]`: a token-mixer ablation sweep, one run after another.

CONFIG is a YAML under `configs/ablate/` (by name) or a path; see `experiments/README.md` for its keys. Each finished
run writes `OUT_DIR/runs/<run_id>/result.json` and is skipped when the sweep runs again, so a sweep resumes where it
stopped, and `--shard i/n` jobs (TPU hosts, separate machines) split it without talking to each other. After its
runs, every job rebuilds results.csv, results.md and the plots from all the result files present.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from experiments.sweep import Run, Sweep, load_sweep, shard, spec_defaults, spec_difference
from qwen35_jax.errors import UserError
from qwen35_jax.layers import MIXERS


def state_size(cfg, seq_len: int) -> int:
    """Floats of recurrent state or KV cache per sequence, summed over the layers (zoology's state size)."""
    return int(sum(MIXERS[m].state_size(cfg, seq_len) for m in cfg.layer_pattern))


def result_path(sweep: Sweep, run: Run) -> Path:
    return sweep.out_dir / "runs" / run.run_id / "result.json"


def finished(sweep: Sweep, run: Run) -> dict | None:
    """The run's stored result, None if it has none; a result from a different setting is an error."""
    path = result_path(sweep, run)
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    diff = spec_difference(old.get("spec", {}), run.spec, spec_defaults(run.spec["task"]))
    if diff is not None:
        raise UserError(f"{path} was produced with a different {diff!r}; use another out_dir or delete "
                        f"{path.parent} to run it again")
    return old


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # shards may write the same file at once
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def execute(sweep: Sweep, run: Run) -> dict:
    """Trains one run and returns its result record (also written to result.json)."""
    t0 = time.perf_counter()
    if sweep.task == "mqar":
        from experiments.mqar_train import train_mqar

        out = train_mqar(run.model, seq_len=run.seq_len, lr=run.lr, settings=run.spec["settings"], seed=run.seed,
                         desc=run.run_id)
    else:
        from experiments.lm_run import train_lm

        out = train_lm(run.model, result_path(sweep, run).parent, lr=run.lr, settings=sweep.settings,
                       seed=run.seed)
    record = {"run_id": run.run_id, "experiment": sweep.experiment, "task": sweep.task, "variant": run.variant,
              "size": run.size, "label": run.label, "lr": run.lr, "seq_len": run.seq_len, "seed": run.seed,
              "params": run.model.param_counts()["total"], "state_size": state_size(run.model, run.seq_len),
              "elapsed_s": time.perf_counter() - t0, **out, "spec": run.spec}
    _write_json(result_path(sweep, run), record)
    return record


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _headline(sweep: Sweep, record: dict) -> str:
    name = "accuracy" if sweep.task == "mqar" else "val_loss"
    value = record["metrics"].get(name, float("nan"))
    return f"{name} {value:.4f}"


def profile_jobs(sweep: Sweep, runs) -> list[tuple[Run, int]]:
    """(first run of each variant/size, seq_len) pairs to profile."""
    firsts = {}
    for run in runs:
        firsts.setdefault(run.label, run)
    return [(run, t) for run in firsts.values() for t in sweep.profile_seq_lens]


def profile_path(sweep: Sweep, run: Run, seq_len: int) -> Path:
    return sweep.out_dir / "profile" / f"{run.label.replace('/', '.')}.T{seq_len}.json"


def run_profiles(sweep: Sweep, jobs) -> None:
    from experiments.throughput import profile_train_step

    for k, (run, t) in enumerate(jobs, 1):
        path = profile_path(sweep, run, t)
        spec = {"model": run.spec["model"], "batch_size": sweep.profile_batch_size}
        if path.exists() and json.loads(path.read_text()).get("spec") == spec:
            continue
        p = profile_train_step(run.model, t, sweep.profile_batch_size, seed=sweep.seeds[0])
        _write_json(path, {"label": run.label, "variant": run.variant, "size": run.size, "seq_len": t,
                           "batch_size": sweep.profile_batch_size, "params": run.model.param_counts()["total"],
                           "state_size": state_size(run.model, t), **p, "spec": spec})
        mem = "n/a" if p["memory_bytes"] is None else f"{p['memory_bytes'] / 2**20:.1f} MiB"
        print(f"[profile {k}/{len(jobs)}] {run.label} T={t}: {p['tokens_per_s']:,.0f} tokens/s, {mem}", flush=True)


def report(sweep: Sweep, command: str) -> list[Path]:
    from experiments.report import write_report

    results = [r for r in (finished(sweep, run) for run in sweep.runs) if r is not None]
    profiles = [json.loads(p.read_text()) for p in (profile_path(sweep, run, t)
                                                      for run, t in profile_jobs(sweep, sweep.runs)) if p.exists()]
    _write_json(sweep.out_dir / "sweep.json", sweep.source)
    return write_report(sweep.out_dir, sweep.experiment, sweep.task, results, profiles, len(sweep.runs), command)


def ablate_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 ablate", description="Run a token-mixer ablation sweep.")
    parser.add_argument("config", help="YAML under configs/ablate/ (name, e.g. mqar) or a path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mqar.steps=200 lrs=[1e-3]")
    parser.add_argument("--shard", help="i/n: run only runs i, i+n, i+2n, ... (0-based) of the grid")
    parser.add_argument("--list", action="store_true", help="print the grid (run ids, params, state) and exit")
    parser.add_argument("--report-only", action="store_true", help="rebuild tables and plots from finished runs")
    args = parser.parse_intermixed_args(argv)  # options may come before, between or after the overrides
    sweep = load_sweep(args.config, args.overrides)
    command = shlex.join(["qwen35", "ablate", args.config, *args.overrides])
    mine = shard(sweep.runs, args.shard)
    done = {run.run_id: finished(sweep, run) for run in mine}  # checks every stored spec before any work
    if args.list:
        for run in mine:
            state = "done" if done[run.run_id] else "todo"
            print(f"{run.run_id:<40} {state}  params {run.model.param_counts()['total']:>10,}  "
                  f"state {state_size(run.model, run.seq_len):>10,}")
        return 0
    if not args.report_only:
        pending = [run for run in mine if done[run.run_id] is None]
        where = f" (shard {args.shard})" if args.shard else ""
        print(f"{sweep.experiment}: {len(mine)} runs{where}, {len(mine) - len(pending)} already done, "
              f"{len(pending)} to go -> {sweep.out_dir}", flush=True)
        for run in mine:
            if done[run.run_id] is not None:
                print(f"[{mine.index(run) + 1}/{len(mine)}] {run.run_id}: skipped, done earlier "
                      f"({_headline(sweep, done[run.run_id])})", flush=True)
        durations = []
        for k, run in enumerate(pending, 1):
            t0 = time.perf_counter()
            record = execute(sweep, run)
            durations.append(time.perf_counter() - t0)
            eta = sum(durations) / len(durations) * (len(pending) - k)
            print(f"[{mine.index(run) + 1}/{len(mine)}] {run.run_id}: {_headline(sweep, record)} "
                  f"({_duration(durations[-1])}, ETA {_duration(eta)})", flush=True)
        if sweep.profile_seq_lens:
            run_profiles(sweep, shard(profile_jobs(sweep, sweep.runs), args.shard))
    for path in report(sweep, command):
        print(f"wrote {path}")
    return 0


__all__ = ["ablate_main", "execute", "finished", "report", "state_size"]
