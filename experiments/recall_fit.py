"""MQAR accuracy at a common recall step: the mixers compared with the plateau's exit time taken out.

At a fixed budget an MQAR cell's accuracy is largely set by when its seed leaves the plateau (`mqar.recall_step`): a
run that reaches recall later trains less after it. Over every run that reached recall in the given results
directories (each learning rate and seed a point; one size and setting), least squares fits

    accuracy = a[variant] + slope * recall_step        (one slope shared by the variants)

and prints each variant's accuracy at the runs' mean recall step, a[variant] + slope * mean, with its standard
error from the residuals. Use it on variants below the accuracy ceiling (a variant at 1.000 on every run has no
slope to share).

    .venv/bin/python -m experiments.recall_fit experiments/results/mqar experiments/results/mqar_d32_seeds34 \\
        --size d32 --variants gdn deltanet gla linear
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from experiments.report import run_metrics, setting


def load_points(dirs, size: str | None, variants) -> list[tuple[str, float, float]]:
    """(variant, recall step, accuracy) of every recorded run of `variants` (and `size`, if given) in `dirs` with a
    recall step in the reports' sense (`report.run_metrics`); all runs must share one (sequence length, pairs)
    setting."""
    points, settings = [], set()
    for d in dirs:
        paths = sorted(Path(d).glob("runs/*/result.json"))
        if not paths:
            raise ValueError(f"{d}: no runs/*/result.json")
        for path in paths:
            r = json.loads(path.read_text())
            if r.get("task") != "mqar" or r["variant"] not in variants or (size and r.get("size") != size):
                continue
            settings.add(setting(r))
            step = run_metrics("mqar", r).get("recall_step", math.nan)  # the reports' recall step, or none
            if not math.isnan(step):
                points.append((r["variant"], step, float(r["metrics"]["accuracy"])))
    if len(settings) > 1:
        raise ValueError(f"runs from several settings (sequence length, pairs): {sorted(settings)}; pick one --size "
                         "or fewer directories")
    return points


def fit(points: list[tuple[str, float, float]]) -> dict:
    """The shared-slope least-squares fit of `points` [(variant, recall step, accuracy)]: {"slope", "slope_se" (per
    1000 steps), "at" (the mean recall step), "variants": {variant: (adjusted accuracy, its standard error, runs)}}."""
    variants = list(dict.fromkeys(v for v, _, _ in points))
    if len(points) <= len(variants) + 1:
        raise ValueError(f"{len(points)} runs reached recall: too few for {len(variants)} intercepts and a slope")
    X = np.array([[float(v == u) for u in variants] + [step / 1000] for v, step, _ in points])
    y = np.array([acc for _, _, acc in points])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    var = float(resid @ resid) / (len(y) - X.shape[1])
    cov = var * np.linalg.pinv(X.T @ X)
    at = float(X[:, -1].mean())
    out = {}
    for i, v in enumerate(variants):
        e = np.zeros(len(coef))
        e[i], e[-1] = 1.0, at
        out[v] = (float(e @ coef), math.sqrt(max(float(e @ cov @ e), 0.0)), sum(p[0] == v for p in points))
    return {"slope": float(coef[-1]), "slope_se": math.sqrt(max(float(cov[-1, -1]), 0.0)), "at": 1000 * at,
            "residual_sd": math.sqrt(var), "variants": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="results directories (each with runs/*/result.json)")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--size", default=None, help="only runs of this size (e.g. d32)")
    args = ap.parse_args(argv)
    points = load_points(args.dirs, args.size, args.variants)
    f = fit(points)
    total = len(points)
    print(f"{total} runs reached recall; slope {f['slope']:+.3f} +- {f['slope_se']:.3f} accuracy per 1000 steps, "
          f"residual sd {f['residual_sd']:.3f}; accuracy at recall step {f['at']:,.0f}:\n")
    print("| variant | runs | adjusted accuracy |\n|---|---:|---:|")
    for v, (value, se, n) in f["variants"].items():
        print(f"| {v} | {n} | {value:.3f} +- {se:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
