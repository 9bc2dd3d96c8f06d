"""The shared-slope fit of MQAR accuracy on the recall step, on points drawn from a known line, and its inputs read
from recorded runs."""

import json

import numpy as np
import pytest

from experiments.recall_fit import fit, load_points, main


def test_fit_recovers_known_intercepts_and_slope():
    rng = np.random.default_rng(0)
    truth, slope = {"a": 0.9, "b": 0.8, "c": 0.7}, -0.1  # per 1000 steps
    points = [(v, float(s), truth[v] + slope * s / 1000) for v in truth for s in rng.uniform(2000, 5000, size=4)]
    f = fit(points)
    at = np.mean([s for _, s, _ in points])
    assert f["slope"] == pytest.approx(slope) and f["at"] == pytest.approx(at)
    for v, (value, se, n) in f["variants"].items():
        assert value == pytest.approx(truth[v] + slope * at / 1000) and se == pytest.approx(0, abs=1e-6) and n == 4
    noisy = [(v, s, acc + rng.normal(0, 0.01)) for v, s, acc in points]
    assert all(se > 0 for _, se, _ in fit(noisy)["variants"].values())
    with pytest.raises(ValueError, match="too few"):
        fit(points[::4])  # one run per variant: no residual left


def _run(path, variant, pairs, curve, acc, seq_len=128, train_kv_pairs=None):
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps({
        "task": "mqar", "variant": variant, "size": "d32", "seq_len": seq_len, "metrics": {"accuracy": acc},
        "train_loss": curve, "spec": {"settings": {"num_kv_pairs": pairs, "train_kv_pairs": train_kv_pairs}}}))


def test_points_are_the_runs_that_reached_recall(tmp_path, capsys):
    crossed = [[10, 4.0], [20, 1.0]]  # below ln(16) / 2 = 1.39 at step 20
    _run(tmp_path / "runs" / "x0", "x", 16, crossed, 0.9)
    _run(tmp_path / "runs" / "x1", "x", 16, [[10, 4.0], [20, 3.0]], 0.1)  # never: left out
    _run(tmp_path / "runs" / "y0", "y", 16, crossed, 0.8)
    _run(tmp_path / "runs" / "z0", "z", 16, crossed, 0.8)  # not asked for
    _run(tmp_path / "runs" / "x2", "x", 16, crossed, 0.5, train_kv_pairs=[8, 16])  # a pair-count mix: no step
    assert sorted(load_points([tmp_path], "d32", ["x", "y"])) == [("x", 20.0, 0.9), ("y", 20.0, 0.8)]
    _run(tmp_path / "runs" / "y1", "y", 8, crossed, 0.8)
    with pytest.raises(ValueError, match="several settings"):
        load_points([tmp_path], None, ["x", "y"])
    with pytest.raises(ValueError, match="no runs"):
        main([str(tmp_path / "empty"), "--variants", "x"])
