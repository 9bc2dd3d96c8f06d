"""Which platform the kernels are traced for: the default backend, or TPU while compiling ahead of time for a TPU
topology on a host without one (`qwen35 aot`, tests, benchmarks). `impl="auto"` picks the Pallas kernels, and
`interpret=None` means compiled Mosaic, exactly when the target is TPU."""

from __future__ import annotations

import contextlib

import jax

_TARGETS: list[str] = []


@contextlib.contextmanager
def compile_for(platform: str):
    """Trace kernels for `platform` ("tpu", "cpu", "gpu") inside the block, whatever the local backend is."""
    _TARGETS.append(platform)
    try:
        yield
    finally:
        _TARGETS.pop()


def target_platform() -> str:
    return _TARGETS[-1] if _TARGETS else jax.default_backend()


def on_tpu() -> bool:
    return target_platform() == "tpu"
