"""`qwen35 convert`: a Hugging Face checkpoint to an orbax parameter checkpoint that `train` can start from, and back.

An orbax parameter checkpoint is a folder with `params/` (orbax) and `model.json` (the ModelConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import orbax.checkpoint as ocp

from qwen35_jax import hf
from qwen35_jax.config import from_dict
from qwen35_jax.errors import UserError


def save_orbax_params(cfg, params, path) -> None:
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params, force=True)
    (path / "model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def read_model_config(path):
    path = Path(path)
    if (path / "model.json").exists():
        return from_dict(json.loads((path / "model.json").read_text()), source=str(path / "model.json"))
    if (path / "config.json").exists():  # a run directory
        return from_dict(json.loads((path / "config.json").read_text())["model"], source=str(path / "config.json"))
    raise UserError(f"{path}: neither model.json (converted checkpoint) nor config.json (run directory)")


def load_orbax_params(path):
    """Params (host arrays) from a converted folder (`params/`) or a run directory (newest checkpoint's params)."""
    path = Path(path).absolute()
    if (path / "params").exists():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path / "params")
    ckpt_dir = path / "checkpoints"
    if ckpt_dir.exists():
        mngr = ocp.CheckpointManager(ckpt_dir)
        step = mngr.latest_step()
        if step is None:
            raise UserError(f"{ckpt_dir}: no checkpoints")
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        mngr.close()
        return restored["state"]["params"]
    raise UserError(f"{path}: no orbax parameters (expected params/ or checkpoints/)")


def convert_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 convert", description=__doc__.splitlines()[0])
    parser.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="float32", help="parameter dtype to write (float32, bfloat16)")
    args = parser.parse_args(argv)
    if args.direction == "hf-to-orbax":
        cfg, params = hf.load(args.src, dtype=args.dtype)
        save_orbax_params(cfg, params, args.dst)
    else:
        cfg = read_model_config(args.src)
        params = load_orbax_params(args.src)
        hf.save(cfg.replace(param_dtype=args.dtype), params, args.dst)
    print(f"wrote {args.dst}")
    return 0
