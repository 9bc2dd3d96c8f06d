"""Training configuration: frozen dataclasses loaded from YAML (`configs/train/*.yaml`) with dotted `key=value` overrides.

Every mistake is a one-line `ConfigError` naming the key (with the nearest valid key for typos).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from qwen35_jax.config import (CONFIG_DIR, ConfigError, ModelConfig, load_config, parse_overrides,
                               read_yaml_mapping)
from qwen35_jax.precision import Fp8Config

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}  # fp8: bf16 around the FP8 matmuls


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay), "constant"
    warmup_steps: int = 25
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms: bool = True  # zero-centred norms: decay pulls the scale towards 1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: Any = "tiny"  # preset name, YAML path, or a mapping of model keys
    steps: int = 250
    batch_size: int = 16  # global batch (rows of seq_len tokens)
    seq_len: int = 256
    run_dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = 125
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 125
    eval_batches: int = 8
    data: Any = dataclasses.field(default_factory=lambda: {"kind": "stdlib"})
    eval_data: Any = None  # default: the validation split of `data`
    tokenizer: Any = dataclasses.field(default_factory=lambda: {"kind": "stdlib", "vocab_size": 4096})
    mesh: Any = dataclasses.field(default_factory=dict)  # axis sizes, e.g. {data: -1, fsdp: 2}
    precision: str = "auto"  # "bf16" compute (fp32 master params), "fp32", "fp8"; "auto": bf16 on TPU/GPU, fp32 on CPU
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)  # which matmuls precision=fp8 quantizes
    optimizer: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    z_loss: float = 0.0
    router_aux_loss: bool = True
    router_z_loss: float = 0.0  # coefficient of the router z-loss (ST-MoE uses 1e-3); 0 turns it off
    mtp_lambda: float = 0.1  # weight of the MTP loss (needs a model with mtp_num_layers: 1); 0 turns MTP off
    nonfinite: str = "stop"  # "stop" (save and stop) or "skip" (skip the update and go on)
    num_workers: int = 0
    init_from: str | None = None  # orbax checkpoint dir or Hugging Face folder to start from
    sample_tokens: int = 200
    sample_prompt: str = "def "
    tensorboard: bool = True
    peak_tflops: float | None = None  # per device; default: TPU table or a measured CPU matmul rate

    def model_config(self) -> ModelConfig:
        dtype = PRECISIONS[resolve_precision(self.precision)]
        base = self.model if isinstance(self.model, (str, dict)) else str(self.model)
        cfg = load_config(base)
        return cfg.replace(param_dtype="float32", dtype=dtype)


def resolve_precision(precision: str) -> str:
    """"auto" is bf16 where the hardware has bf16 matmuls and fp32 on CPU (where XLA emulates bf16, ~1.4x slower)."""
    if precision != "auto":
        return precision
    import jax

    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def _nearest(key, options):
    m = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"{where}: unknown key {k!r}{_nearest(k, fields)}")
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: key {k!r} must be a mapping, got {v!r}")
            v = _build(type(default), v, f"{where}.{k}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: key {k!r} must be true/false, got {v!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    raise ConfigError(f"{where}: key {k!r} must be a number, got {v!r}") from None
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{where}: key {k!r} must be a number, got {v!r}")
            if isinstance(default, int):
                if float(v) != int(v):
                    raise ConfigError(f"{where}: key {k!r} must be an integer, got {v!r}")
                v = int(v)
        kwargs[k] = v
    return cls(**kwargs)


def set_dotted(d: dict, key: str, value):
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p!r} is not a mapping")
    node[parts[-1]] = value


def resolve_path(config: str | None) -> Path | None:
    if config is None:
        return None
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):
        candidate = CONFIG_DIR / "train" / f"{config}.yaml"
        if candidate.exists():
            return candidate
        names = sorted(p.stem for p in (CONFIG_DIR / "train").glob("*.yaml"))
        raise ConfigError(f"unknown training config {config!r}{_nearest(config, names)}; "
                          f"configs/train has: {', '.join(names)}")
    if not path.exists():
        raise ConfigError(f"training config file {str(path)!r} does not exist")
    return path


def load_train_config(config: str | None = None, overrides=()) -> TrainConfig:
    data: dict = {}
    path = resolve_path(config)
    if path is not None:
        data = read_yaml_mapping(path, "training keys")
    for k, v in parse_overrides(overrides if isinstance(overrides, dict) else list(overrides)).items():
        if k.startswith("model.") and isinstance(data.get("model", "tiny"), str):
            data["model"] = {"base": data.get("model", "tiny")}
        set_dotted(data, k, v)
    model = data.get("model", "tiny")
    if isinstance(model, dict):  # a mapping may name a base preset and override keys of it
        model = dict(model)
        base = model.pop("base", None)
        data["model"] = load_config(base, **model) if base else load_config(model)
        data["model"] = dataclasses.asdict(data["model"])
    cfg = _build(TrainConfig, data, str(path) if path else "train config")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"train config: {msg}")

    need(cfg.precision in PRECISIONS or cfg.precision == "auto",
         f"precision {cfg.precision!r} is not one of auto, fp32, bf16, fp8")
    cfg.fp8.validate()
    for k in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every", "eval_every", "keep_checkpoints"):
        need(getattr(cfg, k) > 0, f"{k} must be positive, got {getattr(cfg, k)}")
    need(cfg.optimizer.grad_accum >= 1, "optimizer.grad_accum must be >= 1")
    need(cfg.batch_size % cfg.optimizer.grad_accum == 0,
         f"batch_size={cfg.batch_size} is not divisible by optimizer.grad_accum={cfg.optimizer.grad_accum}")
    need(cfg.optimizer.schedule in ("cosine", "wsd", "constant"),
         f"optimizer.schedule {cfg.optimizer.schedule!r} is not one of cosine, wsd, constant")
    need(cfg.optimizer.lr > 0, f"optimizer.lr must be positive, got {cfg.optimizer.lr}")
    need(cfg.nonfinite in ("stop", "skip"), f"nonfinite {cfg.nonfinite!r} is not one of stop, skip")
    need(cfg.z_loss >= 0 and cfg.router_z_loss >= 0, "z_loss and router_z_loss must be >= 0")
    need(isinstance(cfg.data, (dict, str)), "data must be a mapping (a data spec) or a path")
    need(isinstance(cfg.mesh, dict), f"mesh must be a mapping of axis sizes, got {cfg.mesh!r}")
    model = cfg.model_config()
    need(cfg.seq_len <= model.max_position_embeddings,
         f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={model.max_position_embeddings}")
