"""`qwen35 train-vl [CONFIG] [key=value ...]`: image-text training with the vision tower in the step.

With no config it trains the embedded default: the `tiny` text model plus a 2-block vision tower on the shapes set
drawn on the fly (data/multimodal.py), 300 steps of 16 captioned 64 x 64 images, on CPU in minutes. Data specs:
`{kind: shapes, image_size: 64}` or `{kind: image_jsonl, path: d.jsonl, image_size: 64}` (records
`{"image": path or [paths], "text": ...}`, the `tokenizer` key as for `qwen35 train`; the model's vision token ids
must then be the tokenizer's). Writes `metrics.jsonl` (loss, grad norm, tokens/s per logged step; validation
rows) and `summary.json` into run_dir. The validation `content_nats` (shapes only) is the summed loss on the
colour, shape and position words: a model that ignores the image cannot go below `text_floor_nats`.

Not yet here (the text trainer's machinery): checkpoints and resumption, meshes, the closing sample.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import paths
from qwen35_jax.errors import UserError

TINY_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
               "num_position_embeddings": 64}
DEFAULTS = {"model": {"base": "tiny", "vision": TINY_VISION}, "steps": 300, "batch_size": 16, "seq_len": 16,
            "run_dir": "runs/multimodal", "log_every": 10, "eval_every": 100, "eval_batches": 4,
            "data": {"kind": "shapes", "image_size": 64}, "optimizer": {"lr": 2e-3, "warmup_steps": 20}}


def _source(spec: dict, tokenizer_cfg, split: str):
    from qwen35_jax.data import multimodal as mm

    kind = spec.get("kind")
    if kind == "shapes":
        return mm.ShapesSource(int(spec.get("num_examples", 100_000)), int(spec.get("seed", 0)), split), \
            mm.shapes_tokenizer()
    if kind == "image_jsonl":
        if not spec.get("path"):
            raise UserError(f"data spec {spec}: kind 'image_jsonl' needs a 'path'")
        from qwen35_jax.train.data import tokenizer_for

        return mm.JsonlImageText(spec["path"]), tokenizer_for(tokenizer_cfg)
    raise UserError(f"data spec {spec}: kind must be 'shapes' or 'image_jsonl' for train-vl, got {kind!r}")


def build(config=None, overrides=()):
    """(tcfg, model_cfg, train source, val source, tokenizer, image_size)."""
    from qwen35_jax.config import parse_overrides
    from qwen35_jax.train.config import load_train_config

    base = dict(DEFAULTS)
    if isinstance(config, (str, Path)):
        from qwen35_jax.schema import read_yaml_mapping

        base = {**base, **read_yaml_mapping(config, "train keys")}
    elif isinstance(config, dict):
        base = {**base, **config}
    ov = parse_overrides(overrides)
    spec = {**base["data"], **{k[5:]: v for k, v in ov.items() if k.startswith("data.")}}
    ov = {k: v for k, v in ov.items() if not k.startswith("data.")}
    train, tokenizer = _source(spec, None, "train")
    if spec["kind"] == "shapes":
        val, _ = _source(spec, None, "validation")
        model = dict(base["model"])
        model.update(vocab_size=tokenizer.vocab_size, vision={**model.get("vision", {}), **tokenizer.vision_ids()},
                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        base["model"] = model
    else:
        val = train
    image_size = int(spec.get("image_size", 64))
    tcfg = load_train_config({k: v for k, v in base.items() if k != "data"} | {"data": {"kind": "stdlib"}},
                             [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()])
    model_cfg = tcfg.model_config()
    if model_cfg.vision is None:
        raise UserError("train-vl needs a model with a vision tower (model.vision)")
    if spec["kind"] == "image_jsonl":
        tokenizer = _source(spec, tcfg, "train")[1]
        v = model_cfg.vision
        top = max(v.image_token_id, v.vision_start_token_id, v.vision_end_token_id)
        if top >= model_cfg.vocab_size:
            raise UserError(f"model.vision token ids (up to {top}) are outside vocab_size={model_cfg.vocab_size}")
    return tcfg, model_cfg, train, val, tokenizer, image_size


def content_ids(tokenizer):
    from qwen35_jax.data.multimodal import COLOURS, PLACES, SHAPES

    words = set(COLOURS) | set(SHAPES) | {w for p in PLACES for w in p.split()}
    return np.array(sorted(tokenizer.ids[w] for w in words if w in getattr(tokenizer, "ids", {})), np.int32)


def train_vl(config=None, overrides=(), *, quiet: bool = False) -> dict:
    from qwen35_jax.data.multimodal import SHAPES_TEXT_FLOOR_NATS, batches
    from qwen35_jax.model import forward, init_params
    from qwen35_jax.train.optimizer import make_optimizer
    from qwen35_jax.train.step import init_state, make_train_step

    tcfg, model_cfg, train_src, val_src, tokenizer, image_size = build(config, overrides)
    run_dir = paths.path(tcfg.run_dir)  # local or gs://
    run_dir.mkdir(parents=True, exist_ok=True)
    params = init_params(model_cfg, jax.random.key(tcfg.seed))
    tx, schedule = make_optimizer(tcfg.optimizer, tcfg.steps, params)
    state = init_state(params, tx)
    step_fn = jax.jit(make_train_step(model_cfg, tcfg, tx, schedule), donate_argnums=0)
    content = jnp.asarray(content_ids(tokenizer))

    @jax.jit
    def eval_fn(params, batch):
        logits = forward(model_cfg, params, batch["tokens"], segment_ids=batch["segment_ids"],
                         positions=jnp.moveaxis(batch["positions"], 1, 0), vision=batch["vision"])
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["loss_mask"]
        is_content = jnp.isin(batch["targets"], content) & (batch["loss_mask"] > 0)
        return jnp.sum(nll), jnp.sum(batch["loss_mask"]), jnp.sum(jnp.where(is_content, nll, 0.0))

    kw = dict(tokenizer=tokenizer, vcfg=model_cfg.vision, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
              image_size=image_size)
    val_batches = [b for b, _ in zip(batches(val_src, seed=tcfg.seed + 1, shuffle=False, **kw),
                                     range(tcfg.eval_batches))]

    def evaluate(step):
        tot = [0.0, 0.0, 0.0]
        for b in val_batches:
            for j, x in enumerate(eval_fn(state["params"], b)):
                tot[j] += float(x)
        row = {"step": step, "val_loss": tot[0] / max(tot[1], 1.0)}
        if len(content):
            row["content_nats"] = tot[2] / (len(val_batches) * tcfg.batch_size)
            row["text_floor_nats"] = SHAPES_TEXT_FLOOR_NATS
        return row

    metrics = (run_dir / "metrics.jsonl").open("w")

    def log(row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if not quiet:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    evals = [evaluate(0)]
    log(evals[-1])
    it = batches(train_src, seed=tcfg.seed, **kw)
    t0, first, last, tokens_done, compile_s = time.perf_counter(), None, None, 0.0, 0.0
    for step in range(1, tcfg.steps + 1):
        state, out = step_fn(state, next(it))
        if step == 1:  # throughput from the second step on: the first one compiles
            jax.block_until_ready(out)
            t0, compile_s = time.perf_counter(), time.perf_counter() - t0
            continue
        tokens_done += float(out["tokens"])
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            loss = float(out["loss"])
            first = loss if first is None else first
            last = loss
            el = time.perf_counter() - t0
            log({"step": step, "loss": loss, "grad_norm": float(out["grad_norm"]), "lr": float(out["lr"]),
                 "tokens_per_s": tokens_done / el, "eta_s": el / (step - 1) * (tcfg.steps - step)})
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            evals.append(evaluate(step))
            log(evals[-1])
    metrics.close()
    summary = {"steps": tcfg.steps, "first_logged_loss": first, "final_loss": last, "evals": evals,
               "train_s": time.perf_counter() - t0, "compile_s": compile_s, "model": model_cfg.name,
               "run_dir": str(run_dir), "load_avg_1m": os.getloadavg()[0],
               "params": int(sum(x.size for x in jax.tree.leaves(state["params"])))}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_vl_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 train-vl", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a train YAML (defaults: the embedded shapes run)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (data.kind=..., model.vision.depth=...)")
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config] + overrides
    s = train_vl(config, overrides)
    e0, e1 = s["evals"][0], s["evals"][-1]
    print(f"done: val loss {e0['val_loss']:.3f} -> {e1['val_loss']:.3f} in {s['train_s']:.0f}s; "
          f"summary in {Path(s.get('run_dir', '.'))}")
    return 0
