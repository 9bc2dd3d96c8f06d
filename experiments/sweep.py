"""Sweep definitions: a YAML mapping (`configs/ablate/*.yaml`) plus dotted `key=value` overrides -> a list of runs.

The grid is variants x sizes x learning rates x seeds (x sequence lengths for MQAR). Every mistake is a one-line
`ConfigError` naming the key. A run's `spec` holds everything that determines its result, so a finished run is
reused only when its spec is unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from qwen35_jax.config import CONFIG_DIR, ConfigError, ModelConfig, load_config, to_dict
from qwen35_jax.schema import apply_overrides, build, nearest, read_yaml_mapping, resolve_file
from qwen35_jax.schema import to_dict as plain

SWEEP_DIR = CONFIG_DIR / "ablate"
TASKS = ("mqar", "lm")


@dataclasses.dataclass(frozen=True)
class MQARSettings:
    """The `mqar:` section: the synthetic recall task and its training budget."""

    seq_lens: tuple[int, ...] | int = (64, 128, 256)  # sequence lengths (even)
    num_kv_pairs: int | list[int] | dict[int, int | list[int]] | None = None  # pairs per row; a list: a run each
    # zoology trains on a mix of easier and harder rows; the test rows keep the run's num_kv_pairs
    train_kv_pairs: list[int] | None = None  # training rows split evenly over these counts (repeat one to weight it)
    vocab_size: int = 256  # token vocabulary of the task
    train_examples: int = 20000  # training examples per length
    test_examples: int = 1000  # test examples per length
    steps: int = 1000  # optimizer steps per run
    batch_size: int | dict[int, int] = 32  # examples per step (per length)
    eval_batch_size: int = 250  # examples per evaluation batch
    warmup_steps: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay
    clip_norm: float = 1.0  # global gradient-norm clip
    power_a: float = 0.01  # power-law skew of the key distribution (zoology)
    random_non_queries: bool = True  # fill unused positions with random tokens (zoology); false: token 0
    lr_schedule: str = "cosine"  # after warmup: cosine (to 0.1x), wsd (hold, then decay over the last 20%), constant


@dataclasses.dataclass(frozen=True)
class LMSettings:
    """The `lm:` section: language-model runs through the trainer."""

    steps: int = 250  # optimizer steps per run
    batch_size: int = 16  # rows per step
    seq_len: int = 256  # tokens per row
    data: dict[str, Any] | str = dataclasses.field(default_factory=lambda: {"kind": "stdlib"})  # data spec or path
    tokenizer: dict[str, Any] | str = dataclasses.field(
        default_factory=lambda: {"kind": "stdlib", "vocab_size": 4096})  # tokenizer spec or file
    eval_batches: int = 8  # batches per validation pass
    eval_every: int = 50  # steps between validation passes
    log_every: int = 10  # steps between metric lines
    sink_rows: int = 4  # validation rows for the attention-sink share
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra trainer keys (dotted allowed)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep file (`configs/ablate/*.yaml`): variants x sizes x learning rates x seeds (x lengths for MQAR)."""

    experiment: str = ""  # name of the sweep (results go to experiments/results/NAME); required
    task: str = ""  # mqar or lm; required
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # base model keys: {base: PRESET, ...keys}
    variants: dict[str, str | dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> pattern or keys
    sizes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> model keys; none: one size
    lrs: tuple[float, ...] = ()  # learning rates; required
    seeds: tuple[int, ...] = (0,)  # seeds (initial weights, data order, MQAR data): one run per seed
    out_dir: str | None = None  # results folder; null: experiments/results/EXPERIMENT
    match_params: str | dict[str, Any] | None = None  # VARIANT or {to: VARIANT, by: intermediate_size}
    profile_seq_lens: tuple[int, ...] = ()  # lengths of the memory/throughput profile
    profile_batch_size: int = 4  # batch of the profile
    mqar: MQARSettings | None = None  # task settings (task: mqar)
    lm: LMSettings | None = None  # task settings (task: lm)


MQAR_DEFAULTS = plain(MQARSettings())
LM_DEFAULTS = plain(LMSettings())


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid. `label` is the variant name, with "/size" when the sweep has sizes."""

    run_id: str
    variant: str
    size: str
    lr: float
    seq_len: int
    seed: int
    model: ModelConfig
    spec: dict

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.size}" if self.size else self.variant


@dataclasses.dataclass(frozen=True)
class Sweep:
    experiment: str
    task: str
    runs: tuple[Run, ...]
    settings: dict  # the task's section (mqar or lm) with defaults filled in
    out_dir: Path
    seeds: tuple[int, ...]
    profile_seq_lens: tuple[int, ...]
    profile_batch_size: int
    source: dict  # the resolved YAML mapping, recorded beside the results


def resolve_path(config: str) -> Path:
    """A name under configs/ablate/ or a path to a YAML file."""
    return resolve_file(config, SWEEP_DIR, "sweep")


def _read(config: str, overrides) -> tuple[dict, str]:
    path = resolve_path(config)
    return apply_overrides(_with_base(path, ()), overrides), str(path)


def _with_base(path: Path, seen: tuple) -> dict:
    """The file's mapping; with `base: SWEEP` (a name under configs/ablate/ or a path), the base sweep's mapping with
    this file's keys merged over it: mappings key by key, recursively, any other value replaced. A file with a base
    names its own `experiment`, and writes to its own out_dir (experiments/results/EXPERIMENT unless it sets one)."""
    data = read_yaml_mapping(path, "sweep keys")
    if "base" not in data:
        return data
    data = dict(data)
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a sweep name or YAML path, got {base!r}")
    base_path = resolve_path(base)
    if base_path.resolve() in seen + (path.resolve(),):
        raise ConfigError(f"{path}: key 'base': {base!r} leads back to this file")
    if "experiment" not in data:
        raise ConfigError(f"{path}: key 'experiment' is required with 'base' (else it would write {base!r}'s results)")
    merged = _merge({k: v for k, v in _with_base(base_path, seen + (path.resolve(),)).items() if k != "out_dir"},
                    data)
    return merged


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def load_sweep_config(config: str, overrides=()) -> SweepConfig:
    data, where = _read(config, overrides)
    return build(SweepConfig, data, where)


def load_sweep(config: str, overrides=()) -> Sweep:
    data, where = _read(config, overrides)
    return build_sweep(data, where=where)


def _need(cond, where: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: key {key!r} {msg}")


def _positive_int(value, where: str, key: str) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and value > 0
    _need(ok, where, key, f"must be a positive integer, got {value!r}")
    return int(value)


def _overrides(value, where: str, key: str) -> dict:
    """A variant is a layer pattern string or a mapping with `layer_pattern` and other model keys."""
    if isinstance(value, str):
        return {"layer_pattern": value}
    _need(isinstance(value, dict), where, key, f"must be a layer pattern string or a mapping, got {value!r}")
    return dict(value)


def _model(base: dict, *layers: tuple[str, dict], where: str) -> ModelConfig:
    merged = dict(base)
    preset = merged.pop("base", "tiny")
    for _, layer in layers:
        merged.update(layer)
    try:
        return load_config(preset, **merged)
    except ConfigError as e:
        keys = " + ".join(k for k, _ in layers)
        raise ConfigError(f"{where}: {keys}: {e}") from None


def _match_params(cfgs: dict[str, ModelConfig], spec, where: str) -> dict[str, ModelConfig]:
    """Widen or narrow each variant's FFN so its parameter count matches the reference variant's."""
    if isinstance(spec, str):
        spec = {"to": spec}
    _need(isinstance(spec, dict) and "to" in spec, where, "match_params",
          f"must be a variant name or {{to: VARIANT, by: intermediate_size}}, got {spec!r}")
    ref, by = spec["to"], spec.get("by", "intermediate_size")
    _need(ref in cfgs, where, "match_params.to", f"names no variant: {ref!r}{nearest(ref, cfgs)}")
    _need(by in ("intermediate_size", "moe_intermediate_size"), where, "match_params.by",
          f"must be intermediate_size or moe_intermediate_size, got {by!r}")
    target = cfgs[ref].param_counts()["total"]
    out = {}
    for name, cfg in cfgs.items():
        width = getattr(cfg, by)
        p0 = cfg.param_counts()["total"]
        per_unit = cfg.replace(**{by: width + 1}).param_counts()["total"] - p0  # the count is linear in the width
        new = int(round(width + (target - p0) / per_unit))
        _need(new > 0, where, "match_params", f"cannot match variant {name!r} to {ref!r}: {by} would be {new}")
        out[name] = cfg.replace(**{by: new}) if new != width else cfg
    return out


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _run_id(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", ".".join(str(p) for p in parts if p != ""))


def build_sweep(data: dict, where: str = "sweep") -> Sweep:
    sc = build(SweepConfig, data, where)
    for k in ("experiment", "task", "variants", "lrs"):
        _need(k in data, where, k, "is required")
    experiment = sc.experiment
    _need(re.fullmatch(r"[A-Za-z0-9_.-]+", experiment), where, "experiment",
          f"must be a name of letters, digits, '_', '.', '-', got {experiment!r}")
    task = sc.task
    _need(task in TASKS, where, "task", f"must be one of {', '.join(TASKS)}, got {task!r}")
    other = "lm" if task == "mqar" else "mqar"
    _need(getattr(sc, other) is None, where, other, f"is a section of task {other!r}; this sweep's task is {task!r}")
    section = getattr(sc, task) or (MQARSettings() if task == "mqar" else LMSettings())
    settings = plain(section)
    base = sc.model
    variants = sc.variants
    _need(variants, where, "variants",
          "must be a non-empty mapping of name -> layer pattern (or a mapping of model keys)")
    sizes = sc.sizes or {"": {}}
    for group, names in (("variants", variants), ("sizes", [s for s in sizes if s])):
        for name in names:
            _need(re.fullmatch(r"[A-Za-z0-9_-]+", str(name)), where, f"{group}.{name}",
                  "is a name with characters other than letters, digits, '_', '-'")
    lrs = list(sc.lrs)
    _need(lrs, where, "lrs", f"must be a non-empty list of learning rates, got {lrs!r}")
    _need(all(lr > 0 for lr in lrs), where, "lrs", f"must be positive, got {lrs}")
    seeds = list(sc.seeds) if isinstance(sc.seeds, (list, tuple)) else [sc.seeds]
    _need(seeds and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds), where, "seeds",
          f"must be a non-empty list of integers >= 0, got {sc.seeds!r}")
    _need(len(set(seeds)) == len(seeds), where, "seeds", f"has a seed twice: {seeds}")
    profile = sc.profile_seq_lens
    for t in profile:
        _need(t > 0, where, "profile_seq_lens", f"must be positive integers, got {list(profile)}")
    profile_batch = _positive_int(sc.profile_batch_size, where, "profile_batch_size")

    if task == "mqar":
        seq_lens = _mqar_settings(settings, where)
        base = {**base, "vocab_size": settings["vocab_size"]}
    else:
        _lm_settings(settings, where)
        seq_lens = [settings["seq_len"]]

    runs = []
    for size, size_over in sizes.items():
        _need(isinstance(size_over, dict), where, f"sizes.{size}",
              f"must be a mapping of model keys, got {size_over!r}")
        cfgs = {}
        for name, value in variants.items():
            over = _overrides(value, where, f"variants.{name}")
            _need("layer_pattern" in over, where, f"variants.{name}", "needs a layer_pattern")
            layers = ([(f"sizes.{size}", size_over)] if size else []) + [(f"variants.{name}", over)]
            cfgs[name] = _model(base, *layers, where=where)
        if sc.match_params:
            cfgs = _match_params(cfgs, sc.match_params, where)
        for name, cfg in cfgs.items():
            cfg = cfg.replace(name=f"{name}/{size}" if size else name)
            for seq_len in seq_lens:
                counts = settings["num_kv_pairs"][seq_len] if task == "mqar" else [None]
                for kv in counts:
                    task_spec = settings
                    if task == "mqar":  # this length's (and pair count's) own settings: what train_mqar receives
                        task_spec = {**settings, "seq_lens": None, "num_kv_pairs": kv,
                                     "batch_size": settings["batch_size"][seq_len]}
                    for lr in lrs:
                        for seed in seeds:
                            spec = {"task": task, "lr": lr, "seed": seed, "settings": task_spec,
                                    "model": _jsonable(to_dict(cfg))}
                            # seed 0 keeps the ids runs had before seeds were an axis (their results are reused);
                            # the pair count is in the id only where a length has several
                            run_id = _run_id(name, size, f"T{seq_len}" if task == "mqar" else "",
                                             f"kv{kv}" if len(counts) > 1 else "", f"lr{_lr_text(lr)}",
                                             f"s{seed}" if seed else "")
                            runs.append(Run(run_id, name, size, lr, seq_len, seed, cfg, spec))
    ids = [r.run_id for r in runs]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    _need(dup is None, where, "lrs", f"gives two runs the same id {dup!r} (learning rates equal to 1 digit)")
    out_dir = Path(sc.out_dir or f"experiments/results/{experiment}")
    return Sweep(experiment, task, tuple(runs), settings, out_dir, tuple(seeds), profile, profile_batch,
                 _jsonable(data))


def _per_seq_len(s: dict, key: str, seq_lens: list[int], default, where: str, several: bool = False) -> dict:
    """An int for every length, or a mapping {seq_len: int} covering every length; with `several`, each entry may
    also be a list of distinct ints (returned as lists)."""
    value = s[key] if s[key] is not None else {t: default(t) for t in seq_lens}
    if not isinstance(value, dict):
        value = {t: value for t in seq_lens}
    value = {int(t) if str(t).isdigit() else t: v for t, v in value.items()}
    missing = [t for t in seq_lens if t not in value]
    _need(not missing, where, f"mqar.{key}", f"has no entry for seq_len {missing[0] if missing else ''}")
    if not several:
        return {t: _positive_int(value[t], where, f"mqar.{key}") for t in seq_lens}
    out = {}
    for t in seq_lens:
        v = value[t] if isinstance(value[t], (list, tuple)) else [value[t]]
        out[t] = [_positive_int(x, where, f"mqar.{key}") for x in v]
        _need(out[t] and len(set(out[t])) == len(out[t]), where, f"mqar.{key}",
              f"must list distinct counts for seq_len {t}, got {value[t]!r}")
    return out


def _mqar_settings(s: dict, where: str) -> list[int]:
    seq_lens = s["seq_lens"] if isinstance(s["seq_lens"], list) else [s["seq_lens"]]
    seq_lens = [_positive_int(t, where, "mqar.seq_lens") for t in seq_lens]
    _need(seq_lens and all(t % 2 == 0 for t in seq_lens), where, "mqar.seq_lens", f"must be even, got {seq_lens}")
    for k in ("vocab_size", "train_examples", "test_examples", "steps", "eval_batch_size"):
        s[k] = _positive_int(s[k], where, f"mqar.{k}")
    _need(isinstance(s["warmup_steps"], int) and s["warmup_steps"] >= 0, where, "mqar.warmup_steps",
          f"must be an integer >= 0, got {s['warmup_steps']!r}")
    for k in ("weight_decay", "clip_norm", "power_a"):
        s[k] = float(s[k])
    _need(s["lr_schedule"] in ("cosine", "wsd", "constant"), where, "mqar.lr_schedule",
          f"must be cosine, wsd or constant, got {s['lr_schedule']!r}")
    _need(isinstance(s["random_non_queries"], bool), where, "mqar.random_non_queries",
          f"must be true or false, got {s['random_non_queries']!r}")
    s["batch_size"] = _per_seq_len(s, "batch_size", seq_lens, None, where)
    s["num_kv_pairs"] = _per_seq_len(s, "num_kv_pairs", seq_lens, lambda t: max(1, t // 16), where,  # zoology: T/16
                                     several=True)
    for t, counts in s["num_kv_pairs"].items():
        for p in counts:
            _need(4 * p <= t, where, "mqar.num_kv_pairs", f"= {p} needs seq_len >= {4 * p}, got seq_len {t}")
            _need(p < s["vocab_size"] // 2, where, "mqar.vocab_size", f"= {s['vocab_size']} is too small for {p} "
                  f"distinct keys and values")
    if s["train_kv_pairs"] is not None:
        mix = s["train_kv_pairs"]
        _need(isinstance(mix, (list, tuple)) and mix, where, "mqar.train_kv_pairs",
              f"must be a non-empty list of pair counts, got {mix!r}")
        s["train_kv_pairs"] = mix = [_positive_int(p, where, "mqar.train_kv_pairs") for p in mix]
        _need(len(mix) <= s["train_examples"], where, "mqar.train_kv_pairs",
              f"has {len(mix)} entries for {s['train_examples']} training examples")
        for p in mix:
            _need(4 * p <= min(seq_lens), where, "mqar.train_kv_pairs", f"= {p} needs seq_len >= {4 * p}, got "
                  f"seq_len {min(seq_lens)}")
            _need(p < s["vocab_size"] // 2, where, "mqar.train_kv_pairs", f"= {p} is too many for vocab_size "
                  f"{s['vocab_size']}")
    s["seq_lens"] = seq_lens
    return seq_lens


def _lm_settings(s: dict, where: str) -> None:
    for k in ("steps", "batch_size", "seq_len", "eval_batches", "eval_every", "log_every", "sink_rows"):
        s[k] = _positive_int(s[k], where, f"lm.{k}")
    _need(isinstance(s["data"], (dict, str)), where, "lm.data", f"must be a data spec or a path, got {s['data']!r}")
    _need(isinstance(s["tokenizer"], (dict, str)), where, "lm.tokenizer",
          f"must be a mapping or a path, got {s['tokenizer']!r}")
    _need(isinstance(s["train"], dict), where, "lm.train",
          f"must be a mapping of extra trainer keys (dotted allowed), got {s['train']!r}")
    s["train"] = _flatten(s["train"])
    for k in s["train"]:
        top = k.split(".")[0]
        _need(top not in ("model", "run_dir", "seed") and k != "optimizer.lr", where, f"lm.train.{k}",
              "is set by the sweep itself (model, seed and lrs are sweep keys)")
        _need(top not in LM_DEFAULTS, where, f"lm.train.{k}", f"duplicates a key of the lm section: use lm.{top}")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"optimizer": {"b2": 0.99}} -> {"optimizer.b2": 0.99}: an override never replaces a whole section."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def shard(runs, spec: str | None):
    """`"i/n"` -> every n-th run starting at i (0-based), so n jobs split a sweep without talking to each other."""
    if not spec:
        return list(runs)
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {spec!r} must be i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    return list(runs)[i::n]


# Model fields that change how the step is compiled, not what it computes: a run recorded with either value stands.
COMPILE_ONLY = ("scan_layers", "remat")


def spec_difference(old: dict, new: dict, defaults: dict | None = None, _path: str = "") -> str | None:
    """None when equal, else the first differing key (dotted). A key missing from `old` (a field added after the run
    was recorded) is equal when `new` holds that field's default (`defaults`, the same nesting); the model's
    `COMPILE_ONLY` fields are not compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        for k in sorted(set(old) | set(new)):
            if k not in old and k in defaults and new.get(k) == defaults[k]:
                continue
            if _path == "model" and k in COMPILE_ONLY:
                continue
            diff = spec_difference(old.get(k), new.get(k), defaults.get(k), f"{_path}.{k}" if _path else k)
            if diff is not None:
                return f"{k}.{diff}" if diff else k
        return None
    return None if old == new else ""


def spec_defaults(task: str | None = None) -> dict:
    """What a field added to the spec after a run was recorded is taken to have been: the model fields' defaults and,
    for a `task`, its settings' scalar defaults."""
    settings = {"mqar": MQARSettings, "lm": LMSettings}.get(task)
    scalars = {f.name: f.default for f in dataclasses.fields(settings)
               if isinstance(f.default, (bool, int, float, str, type(None)))} if settings else {}
    return {"model": _jsonable(to_dict(ModelConfig())), "settings": scalars}


__all__ = ["Run", "Sweep", "load_sweep", "build_sweep", "shard", "resolve_path", "spec_difference", "spec_defaults"]
