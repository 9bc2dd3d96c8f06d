"""Loss curves of two `qwen35 train` runs (bf16 vs fp8, same seed and data): plot, per-step gap, JSON summary.

`python benchmarks/fp8_train_compare.py RUN_BF16 RUN_FP8 --out experiments/results/fp8`
reads each run's metrics.jsonl (the steps both logged), writes loss_curves.png and compare.json.
"""

import argparse
import json
from pathlib import Path


def read(run):
    rows = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            rows[r["step"]] = r
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bf16")
    parser.add_argument("fp8")
    parser.add_argument("--out", default="experiments/results/fp8")
    args = parser.parse_args()
    a, b = read(args.bf16), read(args.fp8)
    steps = sorted(set(a) & set(b))
    gaps = [{"step": s, "bf16": a[s]["loss"], "fp8": b[s]["loss"],
             "rel_gap": (b[s]["loss"] - a[s]["loss"]) / a[s]["loss"]} for s in steps]
    window = [g for g in gaps if g["step"] > steps[-1] - 20] if steps else []
    summary = {
        "steps_compared": len(steps), "last_step": steps[-1] if steps else None,
        "max_abs_rel_gap": max(abs(g["rel_gap"]) for g in gaps) if gaps else None,
        "max_abs_rel_gap_after_step_10": max((abs(g["rel_gap"]) for g in gaps if g["step"] > 10), default=None),
        "mean_rel_gap_last_20_steps": sum(g["rel_gap"] for g in window) / len(window) if window else None,
        "step_40": next((g for g in gaps if g["step"] == 40), None),
        "last": gaps[-1] if gaps else None,
        "runs": {"bf16": str(args.bf16), "fp8": str(args.fp8)},
        "curve": gaps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(steps, [a[s]["loss"] for s in steps], label="bf16")
    ax.plot(steps, [b[s]["loss"] for s in steps], label="fp8 (e4m3 fwd, e5m2 grads)", linestyle="--")
    ax.set_ylabel("train loss")
    ax.legend()
    ax.set_title("qwen35 train (embedded default, tiny): bf16 vs precision=fp8")
    ax2.plot(steps, [100 * g["rel_gap"] for g in gaps])
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_ylabel("fp8 - bf16 (%)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
