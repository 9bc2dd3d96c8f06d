"""`qwen35 train` and `qwen35 eval`: the training loop around the jitted step.

The loop owns what the step cannot: data, checkpoints (resume, SIGTERM, corrupt fallback), non-finite handling,
telemetry, evaluation and the closing text sample.
"""

from __future__ import annotations

import argparse
import json
import signal
import time

import jax
import numpy as np

from qwen35_jax import paths
from qwen35_jax.errors import UserError
from qwen35_jax.schema import to_dict
from qwen35_jax.train import data as train_data
from qwen35_jax.train.checkpoint import Checkpointer, abstract_like, write_json
from qwen35_jax.train.config import TrainConfig, load_train_config
from qwen35_jax.train.metrics import Telemetry, peak_tflops_per_device
from qwen35_jax.train.run import build_run, run_config


def add_distributed_args(parser):
    g = parser.add_argument_group("multi-host (automatic on TPU VMs)")
    g.add_argument("--coordinator", help="host:port of process 0 (jax.distributed.initialize)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def init_distributed(args) -> None:
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif jax.devices()[0].platform == "tpu" and jax.process_count() == 1:
        try:  # multi-host TPU slices discover each other through the TPU metadata
            jax.distributed.initialize()
        except Exception:
            pass


class StopFlag:
    """SIGTERM / first SIGINT: finish the step, save, exit cleanly. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _config_record(tcfg: TrainConfig) -> dict:
    d = to_dict(tcfg)
    d["model"] = to_dict(tcfg.model_config())
    return json.loads(json.dumps(d))


def _check_same_run(run_dir, record: dict) -> None:
    saved = run_dir / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    keys = ("model", "seq_len", "batch_size", "data", "tokenizer", "seed")
    changed = [k for k in keys if old.get(k) != record.get(k)]
    if changed:
        raise UserError(f"{run_dir} holds a run with a different {changed[0]!r}; resume needs the same setting "
                        f"(use another run_dir to start a new run)")


def train(tcfg: TrainConfig) -> dict:
    run_dir = paths.path(tcfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    record = _config_record(tcfg)
    model_cfg = tcfg.model_config()
    tokenizer = train_data.tokenizer_for(tcfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but model {model_cfg.name!r} has vocab_size="
                        f"{model_cfg.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    val_note = train_data.validation_note(tcfg)  # None, or why this run has no validation data

    run = build_run(tcfg)
    mesh, shapes, p_shard, b_shard = run.mesh, run.param_shapes, run.param_shardings, run.batch_sharding

    ckpt = Checkpointer(run_dir / "checkpoints", keep=tcfg.keep_checkpoints)
    telemetry_warn = print if is_main else (lambda *_: None)
    if ckpt.steps():
        _check_same_run(run_dir, record)
    restored = ckpt.restore_latest(abstract_like(run.state_shapes, run.state_shardings), warn=telemetry_warn)
    if restored is not None:
        start_step, state, data_state, _ = restored
        telemetry_warn(f"resuming {run_dir} from step {start_step}")
    else:
        start_step, data_state = 0, None
        state = run.init_state()
        if tcfg.init_from:
            state = dict(state, params=train_data.load_init_params(tcfg.init_from, model_cfg, shapes, p_shard))
    if is_main:
        write_json(run_dir / "config.json", record)

    train_iter = train_data.train_iterator(tcfg, tokenizer, data_state)
    step_fn, eval_fn = run.train_step, run.eval_step

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    flops_per_token = model_cfg.flops_per_token(tcfg.seq_len)
    peak = peak_tflops_per_device(tcfg.peak_tflops) * 1e12 * jax.device_count()
    tel = Telemetry(run_dir, tcfg.steps, start_step, tcfg.tensorboard, enabled=is_main)
    tel.write(f"{model_cfg.name}: {sum(x.size for x in jax.tree.leaves(shapes)) / 1e6:.2f}M params, "
              f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}, {tokens_per_step} tokens/step")
    if val_note:
        tel.write(val_note)
    stop = StopFlag().install()
    summary = {"start_step": start_step}
    last_log_time, last_log_step, compile_s = time.perf_counter(), start_step, None
    step = start_step
    status = "completed"
    try:
        while step < tcfg.steps:
            batch = train_data.to_global(next(train_iter), b_shard)
            t0 = time.perf_counter()
            state, out = step_fn(state, batch)
            finite = bool(out["finite"])  # one scalar per step: non-finite steps are never trained through
            if compile_s is None:
                compile_s = time.perf_counter() - t0
                last_log_time, last_log_step = time.perf_counter(), step + 1
            step += 1
            tel.step()
            if not finite:
                msg = f"non-finite loss or gradients at step {step} (loss={float(out['loss'])}, " \
                      f"grad_norm={float(out['grad_norm'])}); the update was not applied"
                tel.write(msg)
                tel.log(step, {"nonfinite": 1, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"])})
                if tcfg.nonfinite == "stop":
                    status = "nonfinite"
                    summary["error"] = msg
                    break
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                now = time.perf_counter()
                dt = max(now - last_log_time, 1e-9)
                tps = (step - last_log_step) * tokens_per_step / dt if step > last_log_step else 0.0
                last_log_time, last_log_step = now, step
                scalars = {k: np.asarray(v) for k, v in out.items() if k not in ("finite",)}
                scalars.update(tokens_per_s=tps, mfu=tps * flops_per_token / peak)
                tel.log(step, scalars, {"loss": f"{float(out['loss']):.3f}", "tok/s": f"{tps:,.0f}",
                                        "mfu": f"{100 * tps * flops_per_token / peak:.1f}%"})
                summary.update(loss=float(out["loss"]), tokens_per_s=tps)
            if val_note is None and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                val = evaluate(tcfg, tokenizer, eval_fn, state["params"], b_shard)
                tel.log(step, {"val_loss": val, "val_ppl": float(np.exp(val))})
                tel.write(f"step {step}: validation loss {val:.4f} (perplexity {np.exp(val):.2f})")
                summary.update(val_loss=val)
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stop.signal:
                ckpt.save(step, state, train_iter.get_state_json(), {"step": step, "status": status})
            if stop.signal:
                status = f"stopped by {stop.signal}"
                tel.write(f"{stop.signal}: saved step {step}, exiting")
                break
        if status == "nonfinite" and step - 1 not in ckpt.steps():
            ckpt.save(step - 1, state, train_iter.get_state_json(), {"step": step - 1, "status": status})
    finally:
        stop.restore()
        ckpt.close()
        tel.close()
    summary.update(status=status, step=step, compile_s=compile_s, tokens_per_step=tokens_per_step)
    if status == "completed" and tcfg.sample_tokens:
        from qwen35_jax.train.sample import sample_text

        # every process samples: parameters sharded across hosts need all of them in the collectives
        text = sample_text(model_cfg, state["params"], tokenizer, tcfg.sample_prompt, tcfg.sample_tokens,
                           seed=tcfg.seed)
        if is_main:
            (run_dir / "sample.txt").write_text(text)
            print(f"--- sample ({tcfg.sample_tokens} tokens) written to {run_dir / 'sample.txt'} ---\n{text}\n---")
    if is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


def evaluate(tcfg, tokenizer, eval_fn, params, b_shard) -> float:
    total, count = 0.0, 0.0
    for batch in train_data.eval_batches(tcfg, tokenizer):
        s, n = eval_fn(params, train_data.to_global(batch, b_shard))
        total, count = total + float(s), count + float(n)
    if count == 0:  # never a made-up 0.0
        raise UserError(f"validation data {tcfg.eval_data or tcfg.data}: no tokens to score (every document empty?)")
    return total / count


def train_main(argv) -> int:
    from qwen35_jax.cli import config_keys

    parser = argparse.ArgumentParser(
        prog="qwen35 train", description="Train a Qwen3.5-style model.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (defaults of the embedded config; `qwen35 config train CONFIG` shows a recipe's values):\n"
               + config_keys("train"))
    parser.add_argument("config", nargs="?", help="YAML under configs/train/ (name) or a path; none: embedded default")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting (optimizer.lr=1e-3)")
    add_distributed_args(parser)
    args = parser.parse_intermixed_args(argv)  # options before, between or after overrides
    if args.config and "=" in args.config:  # `qwen35 train steps=10`: overrides on the embedded default
        args.overrides.insert(0, args.config)
        args.config = None
    init_distributed(args)
    tcfg = load_train_config(args.config, args.overrides)
    summary = train(tcfg)
    if summary["status"] == "nonfinite":
        raise UserError(summary["error"])
    return 0


def eval_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 eval", description="Score a run's newest checkpoint.")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="e.g. eval_data='{kind: text, path: notes/}' eval_batches=16")
    parser.add_argument("--mtp-acceptance", type=int, default=0, metavar="K",
                        help="also measure teacher-forced MTP acceptance for K chained drafts (mtp_acceptance.py); "
                             "run_dir may then be a Hugging Face folder")
    args = parser.parse_intermixed_args(argv)
    run_dir = paths.path(args.run_dir)
    if args.mtp_acceptance and paths.glob(f"{run_dir}/*.safetensors*"):  # a Hugging Face folder
        from qwen35_jax import mtp_acceptance

        print(json.dumps(mtp_acceptance.hf_eval_main(paths.local_dir(run_dir), args.overrides, args.mtp_acceptance)))
        return 0
    tcfg = run_config(run_dir, args.overrides)  # config.json, read in place (nothing is written to the run)
    tokenizer = train_data.tokenizer_for(tcfg)
    note = train_data.validation_note(tcfg)
    if note:
        raise UserError(note)
    run = build_run(tcfg)
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    restored = ckpt.restore_latest(run.abstract_params(), params_only=True)  # no optimizer moments
    ckpt.close()
    if restored is None:
        raise UserError(f"{run_dir}: no checkpoints to evaluate")
    step, params, _, _ = restored
    val = evaluate(tcfg, tokenizer, run.eval_step, params, run.batch_sharding)
    result = {"step": step, "val_loss": val, "val_ppl": float(np.exp(val))}
    if args.mtp_acceptance:
        from qwen35_jax import mtp_acceptance

        result["mtp_acceptance"] = mtp_acceptance.measure(tcfg.model_config(), params,
                                                          train_data.eval_batches(tcfg, tokenizer), args.mtp_acceptance)
    print(json.dumps(result))
    return 0


__all__ = ["train", "train_main", "eval_main"]
