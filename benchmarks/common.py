"""Shared helpers for the benchmark scripts: timing (medians after warm-up, interleaved peers), a CPU matmul peak,
markdown tables and JSON results.

Machines here are shared and noisy, so comparisons run side by side in one process and alternate between the
contenders step by step (`interleaved`): a burst of load from elsewhere then slows both sides, not one.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# Runnable as `python benchmarks/x.py` from the repository root: make `qwen35_jax` and `benchmarks` importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_load_arguments(parser) -> None:
    """`--cores` (pin this process, both contenders, to these cores), `--max-load` and `--allow-load`."""
    parser.add_argument("--cores", default=None, help="comma-separated CPU ids to pin to (default: all)")
    parser.add_argument("--max-load", type=float, default=0.5,
                        help="refuse to run when the 1-minute load average exceeds this x the cores in use")
    parser.add_argument("--allow-load", action="store_true",
                        help="run anyway on a loaded machine; the results are then marked loaded")


def load_guard(args) -> dict:
    """Pins the process to `args.cores` and checks the machine is idle enough to time on.

    Both contenders run in this process, so pinning gives them the same cores. A load average above
    `max_load` x cores means other processes hold the cores: XLA's one computation and torch's threads then lose
    very different shares, and alternating the contenders does not cancel that (issue 14: a 2.5x "win" measured under
    load was a 0.7x loss idle). Without `--allow-load` that is a one-line error; with it the returned record says
    `loaded: true`, which the tables print. Returns {"cores", "threads", "load_before", "limit", "loaded"}."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if args.cores:
        cores = [int(c) for c in args.cores.split(",")]
        os.sched_setaffinity(0, cores)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    limit = args.max_load * len(cores)
    loaded = load > limit
    if loaded and not args.allow_load:
        raise SystemExit(f"load average {load:.2f} is above {limit:.2f} ({args.max_load} x {len(cores)} cores): "
                         f"other processes share the cores and would skew the comparison; wait, or pass "
                         f"--allow-load to record results marked loaded")
    threads = {"cores": len(cores)}
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return {"cores": cores, "threads": threads, "load_before": load, "limit": limit, "loaded": loaded}


def load_line(guard: dict) -> str:
    """The machine-state line every table carries: load before and now, cores, threads, loaded or idle."""
    now = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    state = "LOADED (not a comparison to record)" if guard["loaded"] else "idle"
    return (f"machine: {state}; load average {guard['load_before']:.2f} before, {now:.2f} now (limit "
            f"{guard['limit']:.2f}); cores {','.join(map(str, guard['cores']))}; threads {guard['threads']}")


def machine_record(guard: dict) -> dict:
    """`load_guard`'s record with the load average now, for the results JSON."""
    return {**guard, "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0}


def block(x):
    """Waits for every jax array in `x` (a pytree); other leaves pass through. Returns x."""
    import jax

    for leaf in jax.tree.leaves(x):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return x


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, minor page faults) for one call of `fn`, waiting for jax results.

    CPU seconds count every thread of this process: on a machine shared with other jobs they measure the work done,
    while wall time also counts the time other processes held the cores. Page faults count first touches of
    memory the allocator got fresh from the kernel (benchmarks/README.md, "Host allocator").
    """
    f0, c0, t0 = _minor_faults(), time.process_time(), time.perf_counter()
    block(fn())
    return time.perf_counter() - t0, time.process_time() - c0, _minor_faults() - f0


def _summary(calls) -> dict:
    wall = [w for w, _, _ in calls]
    cpu = [c for _, c, _ in calls]
    faults = [f for _, _, f in calls]
    return {"median_s": statistics.median(wall), "times_s": wall, "median_cpu_s": statistics.median(cpu),
            "cpu_s": cpu, "median_page_faults": statistics.median(faults), "page_faults": faults}


def median_time(fn: Callable[[], object], *, warmup: int = 1, steps: int = 5) -> dict:
    """{"median_s", "times_s", "median_cpu_s", "cpu_s", "median_page_faults", "page_faults"}: `warmup` untimed
    calls, then `steps` timed ones."""
    for _ in range(warmup):
        block(fn())
    return _summary([time_call(fn) for _ in range(steps)])


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, steps: int = 5) -> dict[str, dict]:
    """Times several contenders in alternation (a, b, a, b, ...) after `warmup` rounds of each.

    Returns {name: `median_time`'s record}; entry i of each name comes from the same
    round, so per-round ratios (`paired_ratio`) cancel slow drifts in machine load.
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return {name: _summary(t) for name, t in times.items()}


def paired_ratio(num: dict, den: dict, key: str = "times_s") -> float:
    """Median over rounds of den_time / num_time, i.e. how many times faster `num` is than `den`
    (`key="cpu_s"`: the same with CPU seconds)."""
    return statistics.median(d / n for n, d in zip(num[key], den[key]))


def matmul_peak_gflops(n: int = 2048, *, steps: int = 7) -> dict:
    """Measured fp32 matmul throughput of this CPU under XLA: an [n, n] @ [n, n] jnp.dot, median of `steps`.

    The best single time is reported as well ("best_gflops"): on a shared machine it is the closer estimate of the
    unloaded peak. Returns {"n", "median_s", "gflops", "best_gflops"}.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    r = median_time(lambda: dot(a, b), warmup=2, steps=steps)
    flops = 2.0 * n ** 3
    return {"n": n, "median_s": r["median_s"], "gflops": flops / r["median_s"] / 1e9,
            "best_gflops": flops / min(r["times_s"]) / 1e9}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def environment() -> dict:
    """Versions and machine facts that a reader of the JSON needs to interpret the numbers."""
    import jax

    env = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def write_json(path, obj) -> None:
    """Writes `obj` (plus nothing else) as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    print(f"wrote {path}")
