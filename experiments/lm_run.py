"""Language-modelling runs through the trainer, plus the attention-sink share of the trained model.

Each run is `train(load_train_config(None, {...}))` in the run's own directory, so an interrupted run resumes from its
checkpoint. The final parameters are read back from that checkpoint for the sink measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.attention_sink import attention_sink_share
from qwen35_jax.config import ModelConfig
from qwen35_jax.layers import MIXERS
from qwen35_jax.layers.attention import GatedAttention


def has_softmax_attention(cfg: ModelConfig) -> bool:
    return any(issubclass(MIXERS[m], GatedAttention) for m in cfg.layer_pattern)


def train_overrides(model: dict, run_dir: Path, *, lr: float, seed: int, settings: dict) -> dict:
    """The trainer's config for one sweep run (dotted keys; `settings` is the sweep's lm section)."""
    s = settings
    return {
        "model": model, "run_dir": str(run_dir), "seed": seed, "optimizer.lr": lr,
        "steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"], "data": s["data"],
        "tokenizer": s["tokenizer"], "eval_batches": s["eval_batches"], "eval_every": s["eval_every"],
        "log_every": s["log_every"], "checkpoint_every": s["steps"], "keep_checkpoints": 1,
        "sample_tokens": 0, "tensorboard": False, **s["train"],
    }


def read_curve(metrics_file: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar in a trainer's metrics.jsonl (last record per step wins on resume)."""
    if not metrics_file.exists():
        return []
    points = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get(key) is not None:
            points[int(record["step"])] = float(record[key])
    return sorted(points.items())


def sink_share(tcfg, run_dir: Path, rows: int) -> float:
    """Mean first-token attention share over the attention layers, on the first validation batch."""
    from qwen35_jax.train import data as train_data
    from qwen35_jax.train.convert import load_orbax_params

    model_cfg = tcfg.model_config()
    params = load_orbax_params(run_dir)
    batch = next(train_data.eval_batches(tcfg, train_data.tokenizer_for(tcfg)))
    batch = {k: v[:rows] for k, v in batch.items()}
    out = attention_sink_share(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"])
    return out["mean"]


def train_lm(cfg: ModelConfig, run_dir: Path, *, lr: float, settings: dict, seed: int = 0) -> dict:
    """Train `cfg` as a language model; return {"metrics": {...}, "status": ...}.

    Metrics: val_loss (final), tokens_per_s (trainer's last log interval), attention_sink_share (only for patterns
    with a softmax-attention layer, and only when the run completed).
    """
    from qwen35_jax.config import to_dict
    from qwen35_jax.train.config import load_train_config
    from qwen35_jax.train.main import train

    model = {k: list(v) if isinstance(v, tuple) else v for k, v in to_dict(cfg).items()}
    tcfg = load_train_config(None, train_overrides(model, run_dir, lr=lr, seed=seed, settings=settings))
    summary = train(tcfg)
    metrics = {}
    for key in ("val_loss", "tokens_per_s"):  # a run resumed at its last step logs nothing new: read its log
        curve = read_curve(run_dir / "metrics.jsonl", key)
        metrics[key] = float(summary.get(key, curve[-1][1] if curve else float("nan")))
    if summary["status"] != "completed":
        metrics["val_loss"] = float("nan")  # a diverged run has no meaningful final loss
    elif has_softmax_attention(cfg):
        metrics["attention_sink_share"] = sink_share(tcfg, run_dir, settings["sink_rows"])
    return {"metrics": {k: v for k, v in metrics.items() if not np.isnan(v) or k == "val_loss"},
            "status": summary["status"]}


__all__ = ["train_lm", "train_overrides", "read_curve", "sink_share", "has_softmax_attention"]
