"""`qwen35 aot`: compile the real train step for a TPU topology on this (CPU) host with libtpu, and report memory.

Parameters, optimizer state and the batch enter as ShapeDtypeStructs with their shardings over the topology's
devices, so nothing is allocated; XLA:TPU compiles the whole step (Pallas kernels through Mosaic) and reports
per-device memory and its cost-model estimate (an estimate, labelled as such).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time

import jax
import numpy as np

from pallas_kernels import compile_for
from qwen35_jax.errors import UserError
from qwen35_jax.train.config import load_train_config
from qwen35_jax.train.run import build_run

HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32, "v7x": 192,
           "tpu7x": 96}  # tpu7x: libtpu's v7x name; one device per TensorCore, 2 a chip (192 GiB)


def tpu_env() -> None:
    """Quiet libtpu's metadata probing on a host with no TPU attached (harmless, but noisy)."""
    if not any(d.platform == "tpu" for d in _local_devices()):
        for k, v in {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
            os.environ.setdefault(k, v)


def _local_devices():
    try:
        return jax.devices()
    except RuntimeError:
        return []


def topology_devices(name: str):
    """Devices of a named topology such as `v5p:8x8x8`, `v5e:4x4`, `v6e:2x2`."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as e:
        raise UserError(f"topology {name!r} cannot be described by libtpu ({str(e).splitlines()[0][:200]}); "
                        "names look like v5e:2x2, v5p:4x4x4, v6e:8x8") from None
    return list(topo.devices)


def hbm_bytes(topology: str) -> int:
    gen = topology.split(":")[0].lower()
    if gen not in HBM_GIB:
        raise UserError(f"unknown TPU generation {gen!r} in topology {topology!r}; known: {sorted(HBM_GIB)}")
    return HBM_GIB[gen] * 2 ** 30


def per_device_bytes(shapes, shardings) -> int:
    total = 0
    for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
    return total


def lower_train_step(tcfg, devices, target: str | None = "tpu"):
    """(run, lowered): the run builder's train step, the very function `qwen35 train` calls, lowered on abstract
    sharded inputs. `target="tpu"` traces kernels as on TPU (Pallas, compiled Mosaic); None: as on this backend."""
    run = build_run(tcfg, devices)
    ctx = compile_for(target) if target else contextlib.nullcontext()
    with ctx:
        return run, run.lower_train_step()


def compile_train_step(tcfg, devices):
    t0 = time.perf_counter()
    run, lowered = lower_train_step(tcfg, devices)
    model_cfg, mesh = run.model_cfg, run.mesh
    params_b = per_device_bytes(run.param_shapes, run.param_shardings)
    opt_b = per_device_bytes(run.state_shapes["opt_state"], run.state_shardings["opt_state"])
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses programs that cannot fit: report it as a (non-)fit, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled = OutOfMemory(str(e))
    compile_s = time.perf_counter() - t0
    return model_cfg, mesh, compiled, compile_s, params_b, opt_b


class OutOfMemory:
    """What XLA said when the step does not fit: the temporaries it needed, parsed from its message."""

    def __init__(self, message: str):
        self.message = message.splitlines()[0][:400]
        found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
        self.temp_bytes = int(float(found.group(1)) * scale[found.group(2)]) if found else 0


def report(tcfg, topology: str) -> dict:
    tpu_env()
    devices = topology_devices(topology)
    model_cfg, mesh, compiled, compile_s, params_b, opt_b = compile_train_step(tcfg, devices)
    hbm = hbm_bytes(topology)
    run = {"config": model_cfg.name, "topology": topology, "devices": len(devices), "mesh": dict(mesh.shape),
           "remat": model_cfg.remat, "remat_scope": model_cfg.remat_scope,
           "moe_token_chunks": model_cfg.moe_token_chunks, "loss_chunks": tcfg.loss_chunks,
           "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len, "grad_accum": tcfg.optimizer.grad_accum,
           "compile_s": round(compile_s, 2)}
    if isinstance(compiled, OutOfMemory):
        return {**run, "per_device_bytes": params_b + opt_b + compiled.temp_bytes, "hbm_bytes_per_device": hbm,
                "fits": False, "params_bytes": params_b, "optimizer_state_bytes": opt_b,
                "argument_bytes": params_b + opt_b, "temp_bytes": compiled.temp_bytes, "output_bytes": 0,
                "alias_bytes": 0, "xla_error": compiled.message}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    args_b, temp_b = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    out_b, alias_b = int(mem.output_size_in_bytes), int(getattr(mem, "alias_size_in_bytes", 0))
    total = args_b + temp_b + out_b - alias_b + int(getattr(mem, "generated_code_size_in_bytes", 0))
    tokens = tcfg.batch_size * tcfg.seq_len
    return {
        **run, "per_device_bytes": total, "hbm_bytes_per_device": hbm,
        "fits": total <= hbm, "params_bytes": params_b, "optimizer_state_bytes": opt_b,
        "argument_bytes": args_b, "temp_bytes": temp_b, "output_bytes": out_b, "alias_bytes": alias_b,
        "xla_estimate_flops_per_device": float(cost.get("flops", 0.0)),
        "xla_estimate_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "model_flops_per_step": model_cfg.flops_per_token(tcfg.seq_len) * tokens,
    }


def _gib(b):
    return f"{b / 2 ** 30:,.2f} GiB"


def aot_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="qwen35 aot", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (configs/train name or path)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--topology", required=True, help="e.g. v5p:8x8x8, v5e:4x4, v6e:8x8")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args(argv)  # options before, between or after overrides
    tcfg = load_train_config(args.config, args.overrides)
    r = report(tcfg, args.topology)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['config']} on {r['topology']} ({r['devices']} chips), mesh {r['mesh']}, remat={r['remat']} ({r['remat_scope']}), "
          f"batch {r['batch_size']} x {r['seq_len']}, compiled in {r['compile_s']} s")
    rows = [("parameters", r["params_bytes"]), ("optimizer state", r["optimizer_state_bytes"]),
            ("arguments (params + state + batch)", r["argument_bytes"]),
            ("temporaries (activations, workspaces)", r["temp_bytes"]),
            ("total per device", r["per_device_bytes"]), ("HBM per device", r["hbm_bytes_per_device"])]
    for name, b in rows:
        print(f"  {name:<40} {_gib(b):>14}")
    print(f"  fits: {'yes' if r['fits'] else 'NO'} ({100 * r['per_device_bytes'] / r['hbm_bytes_per_device']:.0f}%"
          f" of HBM)")
    if "xla_error" in r:
        print(f"  XLA:TPU refused the program: {r['xla_error']}")
        return 0
    print(f"  XLA cost-model estimate per device: {r['xla_estimate_flops_per_device'] / 1e12:,.1f} TFLOP, "
          f"{r['xla_estimate_bytes_accessed_per_device'] / 2 ** 30:,.1f} GiB accessed (estimate, not a measurement)")
    return 0
