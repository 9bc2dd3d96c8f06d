"""`qwen35 convert`: a Hugging Face checkpoint to an orbax parameter checkpoint that `train` can start from, and back.

An orbax parameter checkpoint is a folder with `params/` (orbax) and `model.json` (the ModelConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import jax
import orbax.checkpoint as ocp

from qwen35_jax import hf, paths
from qwen35_jax.config import from_dict
from qwen35_jax.errors import UserError


def save_orbax_params(cfg, params, path) -> None:
    path = paths.path(path)
    path = path if paths.is_remote(path) else path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params, force=True)
    paths.write_text(path / "model.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def read_model_config(path):
    path = paths.path(path)
    if (path / "model.json").exists():
        return from_dict(json.loads((path / "model.json").read_text()), source=str(path / "model.json"))
    if (path / "config.json").exists():  # a run directory
        return from_dict(json.loads((path / "config.json").read_text())["model"], source=str(path / "config.json"))
    raise UserError(f"{path}: neither model.json (converted checkpoint) nor config.json (run directory)")


def run_abstract_params(run_dir):
    """A run directory's parameters as the run builder lays them out (train/run.py), over this host's devices:
    the run's own model, its parameter shardings on a mesh that splits fsdp across whatever devices are here (a run
    trained on a pod restores sharded over one host's chips, or whole on one CPU)."""
    from qwen35_jax.train.run import run_from_dir

    return run_from_dir(run_dir, {"mesh": {"fsdp": -1}}).abstract_params()


def load_orbax_params(path, cfg=None, warn=print, abstract=None):
    """Params from a converted folder (`params/`) or a run directory: the newest readable checkpoint's parameters
    only (no optimizer moments), with the training run's fallback past a corrupt newest step (nothing moved).
    `abstract`: the sharded ShapeDtypeStructs to restore into (generate and convert: `run_abstract_params`);
    default: the shapes of `cfg` (or the run's model.json / config.json model), whole on the first device."""
    from qwen35_jax.model import init_params
    from qwen35_jax.train.checkpoint import Checkpointer

    path = paths.path(path)
    path = path if paths.is_remote(path) else path.absolute()
    if (path / "params").exists():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path / "params")
    ckpt_dir = path / "checkpoints"
    if ckpt_dir.exists():
        if abstract is None:
            cfg = cfg if cfg is not None else read_model_config(path)
            abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        ckpt = Checkpointer(ckpt_dir, read_only=True)
        try:
            restored = ckpt.restore_latest(abstract, warn=warn, params_only=True)
        finally:
            ckpt.close()
        if restored is None:
            raise UserError(f"{ckpt_dir}: no checkpoints")
        return restored[1]
    raise UserError(f"{path}: no orbax parameters (expected params/ or checkpoints/)")


def convert_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 convert", description=__doc__.splitlines()[0])
    parser.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="float32", help="parameter dtype to write (float32, bfloat16)")
    args = parser.parse_args(argv)
    if args.direction == "hf-to-orbax":
        cfg, params = hf.load(paths.local_dir(args.src), dtype=args.dtype)
        save_orbax_params(cfg, params, args.dst)
    else:
        cfg = read_model_config(args.src)
        src = paths.path(args.src)
        abstract = run_abstract_params(src) if (src / "checkpoints").exists() else None
        params = load_orbax_params(src, cfg, abstract=abstract)
        if paths.is_remote(args.dst):  # safetensors are written locally, then uploaded
            with tempfile.TemporaryDirectory(prefix="qwen35-convert-") as tmp:
                hf.save(cfg.replace(param_dtype=args.dtype), params, tmp)
                paths.upload_dir(tmp, args.dst)
        else:
            hf.save(cfg.replace(param_dtype=args.dtype), params, args.dst)
    print(f"wrote {args.dst}")
    return 0
