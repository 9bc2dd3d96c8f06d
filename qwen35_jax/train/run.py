"""The one run builder: mesh, abstract state, shardings, optimizer and the jitted train and eval steps of a run.

`train`, `eval`, `aot`, `generate` (for a run directory) and `convert` all start from `build_run`, so the program
`qwen35 aot` compiles is the one `qwen35 train` runs: the same jitted function with the same shardings, lowered on
abstract inputs instead of arrays. Nothing is allocated until `init_state` or a step is called.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qwen35_jax import paths
from qwen35_jax.config import ModelConfig
from qwen35_jax.errors import UserError
from qwen35_jax.model import abstract_params, init_params
from qwen35_jax.sharding import (batch_sharding, make_mesh, param_shardings, replicated, state_shardings, unboxed,
                                 use_mesh)
from qwen35_jax.train.config import TrainConfig, load_train_config
from qwen35_jax.train.optimizer import make_optimizer
from qwen35_jax.train.step import BATCH_KEYS, init_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything about a run that does not depend on data or checkpoints."""

    tcfg: TrainConfig
    model_cfg: ModelConfig  # the model as trained (precision applied)
    mesh: Mesh
    param_shapes: Any  # ShapeDtypeStruct tree, same structure as init_params
    param_shardings: Any
    tx: Any  # the optax transformation
    lr_schedule: Any
    state_shapes: Any  # {"step", "params", "opt_state"} as ShapeDtypeStructs
    state_shardings: Any
    batch_sharding: Any  # of one [batch, seq] array
    train_step: Any  # jitted (state, batch) -> (state, metrics); donates the state
    eval_step: Any  # jitted (params, batch) -> (ce_sum, token count)

    @property
    def batch_shardings(self) -> dict:
        return {k: self.batch_sharding for k in BATCH_KEYS}

    def abstract_state(self):
        """The training state as sharded ShapeDtypeStructs (what checkpoints restore into and aot lowers with)."""
        return _with_shardings(self.state_shapes, self.state_shardings)

    def abstract_params(self):
        """The parameters alone as sharded ShapeDtypeStructs (generate / convert restore only these)."""
        return _with_shardings(self.param_shapes, self.param_shardings)

    def abstract_batch(self) -> dict:
        shape = (self.tcfg.batch_size, self.tcfg.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                         sharding=self.batch_sharding) for k in BATCH_KEYS}
        extra = vision_batch(self.tcfg, self.model_cfg)
        return {**batch, **_with_shardings(extra, vision_batch_shardings(extra, self.mesh, self.tcfg.batch_size))}

    def init_state(self, key=None):
        """Fresh parameters and optimizer state, created sharded (seed: tcfg.seed)."""
        key = jax.random.key(self.tcfg.seed) if key is None else key
        model_cfg, tx, mesh = self.model_cfg, self.tx, self.mesh

        def fn(k):
            with use_mesh(mesh):
                return init_state(init_params(model_cfg, k), tx)

        return jax.jit(fn, out_shardings=self.state_shardings)(key)

    def lower_train_step(self, state=None, batch=None):
        """The train step lowered for `state` and `batch` (default: the abstract ones)."""
        return self.train_step.lower(self.abstract_state() if state is None else state,
                                     self.abstract_batch() if batch is None else batch)


def vision_batch(tcfg, model_cfg) -> dict:
    """A model with a vision tower trains on image-text rows: [B, 3, T] mRoPE positions and per-row vision arrays
    (data/multimodal.py) join the batch; {} for a text model."""
    if model_cfg.vision is None:
        return {}
    from qwen35_jax.data.multimodal import vision_batch_shapes

    spec = tcfg.data if isinstance(tcfg.data, dict) else {}
    return vision_batch_shapes(model_cfg.vision, tcfg.batch_size, tcfg.seq_len, spec.get("image_size"))


def vision_batch_shardings(extra: dict, mesh, batch_size: int) -> dict:
    return jax.tree.map(lambda s: batch_sharding(mesh, len(s.shape), batch_size=batch_size), extra)


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _under_mesh(fn, mesh):
    """`fn` traced with the mesh's activation constraints active, whoever calls (or lowers) it."""

    def wrapped(*args):
        with use_mesh(mesh):
            return fn(*args)

    return wrapped


def build_run(tcfg: TrainConfig, devices=None) -> Run:
    """The run of `tcfg` over `devices` (default: all; for aot, a TPU topology's devices)."""
    model_cfg = tcfg.model_config()
    mesh = make_mesh(tcfg.mesh, devices)
    boxed = abstract_params(model_cfg)
    shapes = unboxed(boxed)
    p_shard = param_shardings(boxed, mesh)
    tx, lr_schedule = make_optimizer(tcfg.optimizer, tcfg.steps, shapes)
    state_shapes = jax.eval_shape(lambda p: init_state(p, tx), shapes)
    s_shard = state_shardings(state_shapes, p_shard, mesh)
    b_shard = batch_sharding(mesh, 2, batch_size=tcfg.batch_size)
    batch_shardings = {k: b_shard for k in BATCH_KEYS}
    batch_shardings.update(vision_batch_shardings(vision_batch(tcfg, model_cfg), mesh, tcfg.batch_size))
    train_step = jax.jit(_under_mesh(make_train_step(model_cfg, tcfg, tx, lr_schedule), mesh),
                         in_shardings=(s_shard, batch_shardings), out_shardings=(s_shard, replicated(mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(_under_mesh(make_eval_step(model_cfg, tcfg.loss_chunks), mesh),
                        in_shardings=(p_shard, batch_shardings))
    return Run(tcfg, model_cfg, mesh, shapes, p_shard, tx, lr_schedule, state_shapes, s_shard, b_shard, train_step,
               eval_step)


def run_config(run_dir, overrides=()) -> TrainConfig:
    """The TrainConfig a run directory was trained with (its config.json), plus overrides."""
    cfg_file = paths.path(run_dir) / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{run_dir}: no config.json (not a qwen35 run directory)")
    try:
        record = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    return load_train_config(record, overrides)


def run_from_dir(run_dir, overrides=(), devices=None) -> Run:
    """The Run of a run directory: what eval, generate and convert restore into."""
    return build_run(run_config(run_dir, overrides), devices)


__all__ = ["Run", "build_run", "run_config", "run_from_dir"]
