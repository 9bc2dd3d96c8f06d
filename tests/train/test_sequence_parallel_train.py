"""`qwen35 train mesh={sequence: 8}` on 8 fake CPU devices gives the losses of one device for the hybrid (GDN,
gated attention, MoE, MTP) with many short packed documents, so document boundaries fall inside and across the
devices' slices of each row."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qwen35_jax.train.config import load_train_config
from qwen35_jax.train.main import train
from tests.cpu_env import cpu_env


def read_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def short_docs(micro, tmp_path_factory):
    """The micro corpus cut into one-line documents (a few to about 30 tokens each)."""
    root = tmp_path_factory.mktemp("short_docs")
    n = 0
    for f in sorted(__import__("pathlib").Path(micro["data"]["path"]).iterdir())[:6]:
        lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
        for line in lines:
            root.joinpath(f"{n:05d}.txt").write_text(line + "\n")
            n += 1
    return root


def test_sequence_mesh_train_matches_one_device(micro, short_docs, tmp_path):
    settings = {**micro, "data": {"kind": "text", "path": str(short_docs), "split": "all"}, "steps": 3,
                "eval_every": 100, "checkpoint_every": 100, "sample_tokens": 0, "batch_size": 2, "seq_len": 128,
                "model.mtp_num_layers": 1, "mtp_lambda": 0.3, "model.gdn_chunk_size": 8}
    # the batches do pack several documents per row, with boundaries off the 16-token slice edges
    from qwen35_jax.train.data import tokenizer_for, train_iterator

    tcfg = load_train_config(None, {**settings, "run_dir": str(tmp_path / "probe")})
    batch = next(train_iterator(tcfg, tokenizer_for(tcfg), None))
    starts = np.nonzero(np.diff(batch["segment_ids"], axis=1))[1] + 1
    assert len(starts) >= 4 and np.any(starts % 16), starts

    single = tmp_path / "single"
    train(load_train_config(None, {**settings, "run_dir": str(single)}))
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in settings.items()]
    args += [f"run_dir={tmp_path / 'seq'}", "mesh={sequence: 8}"]
    env = cpu_env(8)
    out = subprocess.run([sys.executable, "-m", "qwen35_jax.cli", "train", *args], env=env, capture_output=True,
                         text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'sequence': 8" in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
    ref, got = read_metrics(single), read_metrics(tmp_path / "seq")
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (got, ref)
        assert g["mtp_loss"] == pytest.approx(r["mtp_loss"], rel=1e-5), (got, ref)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), (got, ref)
