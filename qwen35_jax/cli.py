"""The `qwen35` command: one subcommand per job; each lives in its own module and is imported on demand."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "info": ("qwen35_jax.cli", "info_main", "describe a model preset: parameters, active parameters, FLOPs/token"),
    "config": ("qwen35_jax.cli", "config_main", "list every config key (train, model, sweep) with its value and doc"),
    "train": ("qwen35_jax.train.main", "train_main", "train a model (no CONFIG: the embedded CPU default)"),
    "train-vl": ("qwen35_jax.train.multimodal", "train_vl_main", "train on image-text data (no CONFIG: shapes)"),
    "eval": ("qwen35_jax.train.main", "eval_main", "score a run's checkpoint on a data spec"),
    "aot": ("qwen35_jax.train.aot", "aot_main", "compile the train step for a TPU topology and report memory"),
    "convert": ("qwen35_jax.train.convert", "convert_main", "Hugging Face checkpoint <-> orbax checkpoint"),
    "tokenizer": ("qwen35_jax.data.tokenizer", "tokenizer_main", "train a sentencepiece tokenizer"),
    "generate": ("qwen35_jax.generate_cli", "generate_main", "generate text from a run or HF checkpoint"),
    "ablate": ("experiments.ablate", "ablate_main", "run an ablation sweep"),
}


def info_main(argv) -> int:
    import argparse

    from qwen35_jax.config import describe, load_config, parse_overrides, preset_names

    parser = argparse.ArgumentParser(prog="qwen35 info", description=COMMANDS["info"][2])
    parser.add_argument("model", nargs="?", help=f"preset or YAML path (presets: {', '.join(preset_names())})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    names = [args.model] if args.model else preset_names()
    for name in names:
        print(describe(load_config(name, **parse_overrides(args.overrides)), args.seq_len))
    return 0


def config_keys(kind: str, config=None, overrides=()) -> str:
    """The key listing of `qwen35 config KIND [CONFIG] [key=value ...]`: defaults, or a config's resolved values."""
    from qwen35_jax.schema import describe, format_keys

    if kind == "train":
        from qwen35_jax.train.config import TrainConfig, load_train_config

        cls, instance = TrainConfig, load_train_config(config, overrides)
    elif kind == "model":
        from qwen35_jax.config import ModelConfig, load_config, parse_overrides

        cls = ModelConfig
        instance = load_config(config, **parse_overrides(overrides)) if config else ModelConfig()
    else:
        from experiments.sweep import SweepConfig, load_sweep_config

        cls = SweepConfig
        instance = load_sweep_config(config, overrides) if config else None
    return format_keys(describe(cls, instance))


def config_main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="qwen35 config", description=COMMANDS["config"][2])
    parser.add_argument("kind", choices=["train", "model", "sweep"])
    parser.add_argument("config", nargs="?", help="a recipe / preset / sweep (name or YAML path): show its values")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting")
    args = parser.parse_intermixed_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    if args.kind == "sweep" and args.overrides and not args.config:
        from qwen35_jax.config import ConfigError

        raise ConfigError("qwen35 config sweep: overrides need a sweep config (configs/ablate name or path)")
    print(config_keys(args.kind, args.config, args.overrides))
    return 0


def usage() -> str:
    lines = ["usage: qwen35 COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qwen35: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from qwen35_jax.errors import run_cli

    return run_cli(lambda: getattr(importlib.import_module(module), func)(rest))


if __name__ == "__main__":
    sys.exit(main())
