"""Run telemetry: a progress bar (step, loss, tokens/s, MFU, ETA), `metrics.jsonl`, TensorBoard events, peak FLOP/s."""

from __future__ import annotations

import json
import math
import time
import jax
import jax.numpy as jnp
from tqdm import tqdm

from qwen35_jax import paths

# Dense bf16 peak per device (TFLOP/s), from the vendors' published numbers (kernels.md).
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0, "H100": 989.0, "H200": 989.0}


def measured_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """The host's fp32 matmul rate, as the MFU denominator where no published peak applies (CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def peak_tflops_per_device(override: float | None = None) -> float:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, tf in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tf
    return measured_matmul_tflops()


def _json_value(v):
    """Strings pass; numbers become floats, and non-finite ones null (metrics.jsonl stays strict JSON)."""
    if isinstance(v, str):
        return v
    v = float(v)
    return v if math.isfinite(v) else None


class Telemetry:
    """Writes one JSON object per logged step; mirrors scalars to TensorBoard; drives the progress bar."""

    SYNC_S = 30.0  # remote run dirs: metrics.jsonl and the event files reach the bucket at least this often

    def __init__(self, run_dir, total_steps: int, start_step: int, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        run_dir = paths.path(run_dir)
        self.jsonl = paths.AppendLog(run_dir / "metrics.jsonl", sync_s=self.SYNC_S) if enabled else None
        self.tb = self.tb_dir = None
        self._last_sync = time.monotonic()
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter

            self.tb_dir = paths.MirroredDir(run_dir / "tensorboard")
            self.tb = SummaryWriter(self.tb_dir.local)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                        unit="step", smoothing=0.1)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, scalars: dict, postfix: dict | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_value(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            if self.tb_dir.remote and time.monotonic() - self._last_sync >= self.SYNC_S:
                self.tb.flush()
                self.tb_dir.sync()
                self._last_sync = time.monotonic()
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
                self.tb_dir.close()
