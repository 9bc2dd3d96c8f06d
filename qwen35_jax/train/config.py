"""Training configuration: typed frozen dataclasses (`TrainConfig.model` is a ModelConfig, `.optimizer` an
OptimConfig), loaded from YAML (`configs/train/*.yaml`) with dotted `key=value` overrides through qwen35_jax.schema.

Every mistake is a one-line `ConfigError` naming the dotted key (with the nearest valid key for typos). Each field's
trailing comment is its doc: `qwen35 config train` lists every key with its default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from qwen35_jax.config import CONFIG_DIR, ConfigError, ModelConfig, load_config
from qwen35_jax.precision import Fp8Config
from qwen35_jax.schema import apply_overrides, build, field, nearest, read_yaml_mapping, resolve_file

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}  # fp8: bf16 around the FP8 matmuls


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup + decay schedule, global-norm clipping and gradient accumulation."""

    lr: float = 3e-3  # peak learning rate
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # after warmup: cosine, warmup-stable-decay, constant
    warmup_steps: int = 25  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # final learning rate as a share of lr (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    decay_embeddings: bool = False  # apply weight decay to the embedding
    decay_norms: bool = True  # decay zero-centred norm weights (pulls the scale towards 1)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # global gradient-norm clip; 0: off
    grad_accum: int = 1  # micro-batches per step (batch_size is the global batch; it must divide)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, schedule, mesh, checkpoints and telemetry."""

    model: ModelConfig = field(default_factory=lambda: load_config("tiny"),
                               doc="preset name, YAML path, or {base: PRESET, ...model keys}; model.KEY=... overrides")
    steps: int = 250  # optimizer steps
    batch_size: int = 16  # global batch (rows of seq_len tokens)
    seq_len: int = 256  # tokens per row
    run_dir: str = "runs/default"  # checkpoints, metrics, events, config.json, summary.json
    seed: int = 0  # parameter init and data order
    checkpoint_every: int = 125  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept
    log_every: int = 10  # steps between metric lines
    eval_every: int = 125  # steps between validation passes
    eval_batches: int = 8  # batches per validation pass
    data: dict[str, Any] | str = field(default_factory=lambda: {"kind": "stdlib"}, doc="data spec (mapping) or path")
    eval_data: dict[str, Any] | str | None = None  # validation data spec; null: the validation split of data
    tokenizer: dict[str, Any] | str = field(default_factory=lambda: {"kind": "stdlib", "vocab_size": 4096},
                                            doc="tokenizer spec (mapping) or file")
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)  # mesh axis sizes, e.g. {data: -1, fsdp: 2}
    precision: Literal["auto", "fp32", "bf16", "fp8"] = field(
        "auto", doc="compute dtype (fp32 master params); auto: bf16 on TPU/GPU, fp32 on CPU; fp8: see fp8.*")
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)  # which matmuls precision=fp8 runs in FP8
    optimizer: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # optimizer keys (optimizer.lr=...)
    z_loss: float = 0.0  # coefficient of the logit z-loss; 0: off
    loss_chunks: int = 1  # the LM heads and losses in this many token slices (remat): fp32 logits of 1/N of the tokens
    router_aux_loss: bool = True  # add the load-balancing loss (model.router_aux_loss_coef), global-batch pooled
    router_z_loss: float = 0.0  # coefficient of the router z-loss (ST-MoE uses 1e-3); 0 turns it off
    mtp_lambda: float = 0.1  # weight of the MTP loss (needs a model with mtp_num_layers: 1); 0 turns MTP off
    nonfinite: Literal["stop", "skip"] = "stop"  # non-finite loss: stop (save and stop) or skip the update
    num_workers: int = 0  # data-loading worker processes
    init_from: str | None = None  # orbax checkpoint dir or Hugging Face folder to start from
    sample_tokens: int = 200  # tokens of the closing text sample; 0: none
    sample_prompt: str = "def "  # prompt of the closing text sample
    tensorboard: bool = True  # write TensorBoard events
    peak_tflops: float | None = None  # per device, for MFU; default: TPU table or a measured CPU matmul rate

    def __post_init__(self):
        validate(self)

    def model_config(self) -> ModelConfig:
        """The model as trained: fp32 master parameters, compute dtype from `precision`."""
        dtype = PRECISIONS[resolve_precision(self.precision)]
        if self.model.param_dtype == "float32" and self.model.dtype == dtype:
            return self.model
        return dataclasses.replace(self.model, param_dtype="float32", dtype=dtype)


def resolve_precision(precision: str) -> str:
    """"auto" is bf16 where the hardware has bf16 matmuls and fp32 on CPU (where XLA emulates bf16, ~1.4x slower)."""
    if precision != "auto":
        return precision
    import jax

    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def resolve_path(config: str | None):
    """A name under configs/train/ or a YAML path (None: the embedded default)."""
    if config is None:
        return None
    return resolve_file(config, CONFIG_DIR / "train", "training config")


def load_train_config(config: str | dict | None = None, overrides=()) -> TrainConfig:
    """A recipe name, YAML path or mapping (None: the embedded default), plus dotted overrides."""
    if isinstance(config, dict):
        data, where = dict(config), "train config"
    else:
        path = resolve_path(config)
        data = read_yaml_mapping(path, "training keys") if path is not None else {}
        where = str(path) if path is not None else "train config"
    data.setdefault("model", "tiny")  # so `model.x=...` modifies the default preset
    apply_overrides(data, overrides)
    return build(TrainConfig, data, where)


def validate(cfg: TrainConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"train config: {msg}")

    cfg.fp8.validate()
    for k in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every", "eval_every", "keep_checkpoints"):
        need(getattr(cfg, k) > 0, f"{k} must be positive, got {getattr(cfg, k)}")
    need(cfg.optimizer.grad_accum >= 1, "optimizer.grad_accum must be >= 1")
    need(cfg.batch_size % cfg.optimizer.grad_accum == 0,
         f"batch_size={cfg.batch_size} is not divisible by optimizer.grad_accum={cfg.optimizer.grad_accum}")
    need(cfg.optimizer.lr > 0, f"optimizer.lr must be positive, got {cfg.optimizer.lr}")
    need(cfg.z_loss >= 0 and cfg.router_z_loss >= 0, "z_loss and router_z_loss must be >= 0")
    need(cfg.loss_chunks >= 1 and cfg.seq_len % cfg.loss_chunks == 0,
         f"loss_chunks={cfg.loss_chunks} must be >= 1 and divide seq_len={cfg.seq_len}")
    check_mesh_keys(cfg.mesh, need)
    need(cfg.seq_len <= cfg.model.max_position_embeddings,
         f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={cfg.model.max_position_embeddings}")


def check_mesh_keys(mesh: dict, need) -> None:
    """Mesh axes are the ones sharding.py knows; sizes are positive or -1 (the rest of the devices)."""
    from qwen35_jax.sharding import MESH_AXES

    for axis, size in mesh.items():
        need(axis in MESH_AXES,
             f"mesh axis {axis!r} is unknown{nearest(axis, MESH_AXES)}; axes: {', '.join(MESH_AXES)}")
        need(size == -1 or size >= 1, f"mesh axis {axis!r} has size {size}; sizes are >= 1, or -1 for the rest")
    rest = [a for a, v in mesh.items() if v == -1]
    need(len(rest) <= 1, f"mesh: only one axis may be -1, got {', '.join(rest)}")


__all__ = ["TrainConfig", "OptimConfig", "load_train_config", "resolve_precision", "PRECISIONS"]
