"""The environment for a test's subprocess: the CPU backend, the suite's own XLA_FLAGS (the Makefile's -O0) kept,
and `devices` fake host devices added."""

import os


def cpu_env(devices: int | None = None) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")
    if devices:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
