"""Sweep outputs from the per-run result files: results.csv, results.md (best over learning rates) and plots.

results.csv has one row per run and metric: `experiment, task, variant, params, state_size, lr, seed, metric, value`.
Tables and plots follow zoology: per seed the best over learning rates, then the mean and range over seeds.
MQAR metrics carry their setting (`accuracy@T=128`; `accuracy@T=128,kv=16` where a length has several pair counts),
so rows of one variant in different settings stay apart; profile rows (`train_tokens_per_s@T=...`,
`compiled_memory_bytes@T=...`) have an empty lr.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from experiments.lm_run import read_curve
from experiments.mqar import recall_step

CSV_COLUMNS = ("experiment", "task", "variant", "params", "state_size", "lr", "seed", "metric", "value")
MAIN_METRIC = {"mqar": ("accuracy", True), "lm": ("val_loss", False)}  # name, higher is better


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def _lr(lr) -> str:
    return f"{lr:.0e}" if lr not in (None, "") else ""


def setting(r: dict) -> tuple[int, int]:
    """A result's task setting: (sequence length, MQAR key-value pairs; 0 for language modelling)."""
    return r["seq_len"], int(r.get("spec", {}).get("settings", {}).get("num_kv_pairs") or 0)


def setting_names(results: list[dict]) -> dict[tuple[int, int], str]:
    """Setting -> its name in tables and metrics: "T=64", or "T=64,kv=8" where one length has several pair counts."""
    keys = sorted({setting(r) for r in results})
    lengths = [t for t, _ in keys]
    return {(t, p): f"T={t}" + (f",kv={p}" if lengths.count(t) > 1 else "") for t, p in keys}


def run_metrics(task: str, r: dict) -> dict[str, float]:
    """A run's recorded metrics, and for MQAR `recall_step` (`mqar.recall_step` of its training curve). Not for runs
    trained on a pair-count mix (`train_kv_pairs`): their curve averages rows of several counts, so no one
    threshold applies."""
    mixed = r.get("spec", {}).get("settings", {}).get("train_kv_pairs")
    if task != "mqar" or not r.get("train_loss") or setting(r)[1] < 2 or mixed:
        return dict(r["metrics"])
    return {**r["metrics"], "recall_step": recall_step(r["train_loss"], setting(r)[1])}


def csv_rows(experiment: str, task: str, results: list[dict], profiles: list[dict]) -> list[dict]:
    rows = []
    names = setting_names(results)
    for r in results:
        for name, value in run_metrics(task, r).items():
            metric = f"{name}@{names[setting(r)]}" if task == "mqar" else name
            rows.append({"experiment": experiment, "task": task, "variant": r["label"], "params": r["params"],
                         "state_size": r["state_size"], "lr": r["lr"], "seed": r.get("seed", 0), "metric": metric,
                         "value": value})
    for p in profiles:
        for name, key in (("train_tokens_per_s", "tokens_per_s"), ("compiled_memory_bytes", "memory_bytes")):
            if p[key] is not None:
                rows.append({"experiment": experiment, "task": task, "variant": p["label"], "params": p["params"],
                             "state_size": p["state_size"], "lr": "", "seed": "", "metric": f"{name}@T={p['seq_len']}",
                             "value": p[key]})
    return rows


def _score(task: str, r: dict) -> float:
    name, higher_is_better = MAIN_METRIC[task]
    v = r["metrics"].get(name, float("nan"))
    return -math.inf if math.isnan(v) else (v if higher_is_better else -v)


def best_over_lrs(task: str, results: list[dict]) -> dict[tuple[str, tuple[int, int], int], dict]:
    """(label, setting, seed) -> the result with the best main metric over learning rates (NaN is worst), as
    zoology reports."""
    best = {}
    for r in results:
        key = (r["label"], setting(r), r.get("seed", 0))
        if key not in best or _score(task, r) > _score(task, best[key]):
            best[key] = r
    return best


def over_seeds(task: str, results: list[dict]) -> dict[tuple[str, tuple[int, int]], dict]:
    """(label, setting) -> mean, min, max of the per-seed best main metric, the seeds and their best runs."""
    name, _ = MAIN_METRIC[task]
    groups: dict[tuple[str, tuple[int, int]], list[dict]] = {}
    for (label, t, _), r in best_over_lrs(task, results).items():
        groups.setdefault((label, t), []).append(r)
    out = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        vals = [r["metrics"].get(name, float("nan")) for r in runs]
        out[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "values": vals,
                    "seeds": [r.get("seed", 0) for r in runs], "runs": runs}
    return out


def _mean_metric(runs: list[dict], key: str) -> float:
    return sum(r["metrics"].get(key, float("nan")) for r in runs) / len(runs)


def _recall_cell(task: str, runs: list[dict]) -> str:
    """"2,450 (3/3)": the mean recall step over the seeds (best runs) that got there, and how many did."""
    steps = [run_metrics(task, r).get("recall_step", float("nan")) for r in runs]
    got = [x for x in steps if not math.isnan(x)]
    return f"{_fmt(sum(got) / len(got), 0) if got else '-'} ({len(got)}/{len(steps)})"


def _spread(agg: dict, digits: int = 4) -> str:
    """"0.9120" for one seed, "0.9120 [0.8800, 0.9510] (3)" for several: mean [min, max] (seeds)."""
    if len(agg["values"]) == 1:
        return _fmt(agg["mean"], digits)
    low, high = _fmt(agg["min"], digits), _fmt(agg["max"], digits)
    return f"{_fmt(agg['mean'], digits)} [{low}, {high}] ({len(agg['values'])})"


def markdown(experiment: str, task: str, results: list[dict], profiles: list[dict], total: int,
             command: str) -> str:
    name, _ = MAIN_METRIC[task]
    agg = over_seeds(task, results)
    labels = list(dict.fromkeys(r["label"] for r in results))
    names = setting_names(results)
    settings = sorted(names)
    seeds = sorted({r.get("seed", 0) for r in results})
    lines = [f"# {experiment} ({task})", "", f"Produced by `{command}`; {len(results)} of {total} runs finished; "
             f"seeds {', '.join(map(str, seeds))}. With several seeds a cell is the mean [min, max] (seeds) of each "
             "seed's best over learning rates.", ""]
    lrs_of = lambda a: ", ".join(sorted({_lr(r["lr"]) for r in a["runs"]}))  # noqa: E731
    if task == "mqar":
        lines += ["## Test accuracy, best over learning rates", "",
                  "| variant | params | " + " | ".join(names[k] for k in settings) + " |",
                  "|---|---:|" + "---:|" * len(settings)]
        for label in labels:
            params = next(r["params"] for r in results if r["label"] == label)
            cells = [_spread(agg[(label, k)]) if (label, k) in agg else "" for k in settings]
            lines.append(f"| {label} | {params:,} | " + " | ".join(cells) + " |")
        lines += ["", "## Per setting", "",
                  "value in context: the share of answers that are one of the row's values, right or wrong; near 1 "
                  "with accuracy near 1/pairs is the plateau before recall forms. recall from step: the first step "
                  "at which the training loss is below ln(pairs) / 2 (`mqar.recall_step`), the mean over the seeds "
                  "that got there (how many of them did); at a fixed budget a later step leaves less training after "
                  "it.", "",
                  "| variant | T | pairs | state size (floats) | accuracy | value in context | recall from step "
                  "| best lr |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (label, (t, pairs)), a in sorted(agg.items(), key=lambda kv: (labels.index(kv[0][0]), kv[0][1])):
            vic = _mean_metric(a["runs"], "value_in_context")
            lines.append(f"| {label} | {t} | {pairs} | {a['runs'][0]['state_size']:,} | {_spread(a)} | {_fmt(vic)} "
                         f"| {_recall_cell(task, a['runs'])} | {lrs_of(a)} |")
    else:
        lines += ["## Validation loss, best over learning rates", "",
                  "| variant | params | state size (floats) | val loss | best lr | attention-sink share | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label in labels:
            a = agg[(label, settings[0])]
            r = a["runs"][0]
            sink, tps = _mean_metric(a["runs"], "attention_sink_share"), _mean_metric(a["runs"], "tokens_per_s")
            lines.append(f"| {label} | {r['params']:,} | {r['state_size']:,} | {_spread(a)} | {lrs_of(a)} "
                         f"| {_fmt(sink, 3)} | {_fmt(tps, 0)} |")
    lrs = sorted({r["lr"] for r in results})
    lines += ["", f"## Every learning rate ({name}{', mean over seeds' if len(seeds) > 1 else ''})", "",
              "| variant | setting | " + " | ".join(_lr(lr) for lr in lrs) + " |",
              "|---|---|" + "---:|" * len(lrs)]
    by_key: dict[tuple, list[float]] = {}
    for r in results:
        by_key.setdefault((r["label"], setting(r), r["lr"]), []).append(r["metrics"].get(name, float("nan")))
    for label in labels:
        for k in settings:
            cells = [_fmt(sum(v) / len(v)) if (v := by_key.get((label, k, lr))) else "" for lr in lrs]
            if any(cells):
                lines.append(f"| {label} | {names[k]} | " + " | ".join(cells) + " |")
    if profiles:
        lines += ["", f"## Training throughput and compiled memory (forward + backward, batch "
                      f"{profiles[0]['batch_size']})", "", "| variant | T | tokens/s | memory (MiB) |",
                  "|---|---:|---:|---:|"]
        for p in profiles:
            mib = None if p["memory_bytes"] is None else p["memory_bytes"] / 2**20
            lines.append(f"| {p['label']} | {p['seq_len']} | {p['tokens_per_s']:,.0f} | {_fmt(mib, 1)} |")
    return "\n".join(lines) + "\n"


def plots(out_dir: Path, task: str, results: list[dict], profiles: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []

    def log_axis(axis, ticks=None):
        """Log scale with plain-number labels (at `ticks`, else at 1-2-5 steps) and no crowded minor labels."""
        if ticks is not None:
            axis.set_major_locator(ticker.FixedLocator(sorted(set(ticks))))
        else:
            axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())

    def save(fig, name):
        path = out_dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        fig.tight_layout()
        fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)

    labels = list(dict.fromkeys(r["label"] for r in results))
    agg = over_seeds(task, results)
    first = {key: a["runs"][0] for key, a in agg.items()}  # curves: the first seed's best run
    if task == "mqar" and results:
        keys = sorted(setting_names(results))  # one panel per (length, pair count)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, sharey=True)
        for ax, t in zip(axes[0], keys):
            for variant in dict.fromkeys(r["variant"] for r in results):  # sizes of a variant form one line
                pts = sorted((a["runs"][0]["state_size"], a["mean"], a["min"], a["max"])
                             for (_, tt), a in agg.items() if tt == t and a["runs"][0]["variant"] == variant)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], fmt="o-", label=variant, capsize=2,
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
            ax.set(xscale="log", title=f"MQAR, T={t[0]}, {t[1]} pairs", xlabel="state size (floats per sequence)",
                   ylim=(-0.02, 1.02))
            log_axis(ax.xaxis)
            ax.margins(x=0.1)
        axes[0][0].set_ylabel("test accuracy (best lr; mean, range over seeds)")
        axes[0][-1].legend(fontsize=7, loc="best")
        save(fig, "mqar_accuracy_vs_state_size.png")
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, sharey=True)
        for ax, t in zip(axes[0], keys):
            runs = [r for (_, tt), r in first.items() if tt == t]
            for r in runs:
                ax.plot([s for s, _ in r["train_loss"]], [v for _, v in r["train_loss"]], label=r["label"], lw=1)
            settings = runs[0]["spec"].get("settings", {})
            if "vocab_size" in settings and "num_kv_pairs" in settings:  # the two reference levels
                vocab, pairs = settings["vocab_size"], settings["num_kv_pairs"]
                ax.axhline(math.log(vocab - vocab // 2), color="grey", ls=":", lw=1)  # uniform over all values
                ax.axhline(math.log(pairs), color="grey", ls="--", lw=1)  # uniform over the row's values
            ax.set(title=f"MQAR, T={t[0]}, {t[1]} pairs (dotted: chance; dashed: row's values)", xlabel="step")
            ax.title.set_fontsize(8)
        axes[0][0].set_ylabel("train loss on the answers (best lr)")
        axes[0][-1].legend(fontsize=7, loc="best")
        save(fig, "mqar_loss_curves.png")
    if task == "lm" and results:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label in labels:
            r = first[(label, setting(results[0]))]
            run_dir = out_dir / "runs" / r["run_id"]
            train = read_curve(run_dir / "metrics.jsonl", "loss")
            val = read_curve(run_dir / "metrics.jsonl", "val_loss")
            line, = ax.plot([s for s, _ in train], [v for _, v in train], label=f"{label} (lr {_lr(r['lr'])})")
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color=line.get_color())
        ax.set(xlabel="step", ylabel="loss (lines: train, dots: validation)", title="Language modelling, best lr")
        ax.legend(fontsize=7)
        save(fig, "lm_loss_curves.png")
    if profiles:
        for key, ylabel, name in (("tokens_per_s", "train tokens/s (fwd + bwd)", "throughput_vs_seq_len.png"),
                                  ("memory_bytes", "compiled memory (MiB)", "memory_vs_seq_len.png")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for label in dict.fromkeys(p["label"] for p in profiles):
                pts = sorted((p["seq_len"], p[key]) for p in profiles if p["label"] == label and p[key] is not None)
                scale = 2**20 if key == "memory_bytes" else 1
                ax.plot([t for t, _ in pts], [v / scale for _, v in pts], "o-", label=label)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=ylabel)
            log_axis(ax.xaxis, [p["seq_len"] for p in profiles])
            log_axis(ax.yaxis)
            ax.legend(fontsize=7)
            save(fig, name)
    return written


def write_report(out_dir: Path, experiment: str, task: str, results: list[dict], profiles: list[dict], total: int,
                 command: str) -> list[Path]:
    """Writes results.csv, results.md and the plots into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(experiment, task, results, profiles))
    os.replace(tmp, csv_path)
    _atomic_write(md_path, markdown(experiment, task, results, profiles, total, command))
    return [csv_path, md_path] + plots(out_dir, task, results, profiles)


__all__ = ["write_report", "csv_rows", "run_metrics", "markdown", "plots", "best_over_lrs", "over_seeds", "setting",
           "setting_names", "CSV_COLUMNS"]
