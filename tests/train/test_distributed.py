"""Two `qwen35 train` processes joined by `jax.distributed` on localhost (one CPU device each) train exactly like
one process over two devices: the same global batches, losses, gradient norms and validation loss, with parameters
fsdp-sharded across the processes, and orbax saves the final checkpoint from both."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.train.conftest import overrides

TIMEOUT_S = 240
# Compile time dominates on a 2-core CPU: one attention layer without MTP compiles ~3x faster than the micro stack
# (GDN, MTP and the mixes are covered by the one-process mesh tests), and LLVM -O0 another ~3x; both runs use it.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="
MODEL = {"model.num_layers": 1, "model.layer_pattern": "A", "model.mtp_num_layers": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(settings, run_dir, log, devices, distributed=(), cache_dir=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{XLA_FLAGS}{devices}"}
    if cache_dir:  # a rerun of the same program loads it instead of compiling again
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    args = [sys.executable, "-m", "qwen35_jax.cli", "train", *overrides(settings, run_dir=str(run_dir))]
    if distributed:
        coordinator, count, index = distributed
        args += ["--coordinator", coordinator, "--num-processes", str(count), "--process-id", str(index)]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def wait_all(procs: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs.values():
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:  # a timeout or a peer stuck in a collective must not outlive the test
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_two_processes_equal_one_process(micro, tmp_path):
    settings = {**micro, **MODEL, "mesh": {"fsdp": 2}, "steps": 4, "log_every": 1, "eval_every": 4,
                "checkpoint_every": 100, "sample_tokens": 1}
    coordinator = f"localhost:{free_port()}"
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = {"one process": launch({**settings, "sample_tokens": 0}, single, tmp_path / "single.log", devices=2)}
    for i in range(2):  # both write to one run_dir, as the hosts of a pod share a bucket
        procs[f"process {i}"] = launch(settings, multi, tmp_path / f"process{i}.log", devices=1,
                                       distributed=(coordinator, 2, i))
    wait_all(procs, TIMEOUT_S)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{p.log.read_text()[-3000:]}"

    (ref, ref_val), (got, got_val) = train_rows(single), train_rows(multi)
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [1, 2, 3, 4]  # process 0 alone logs
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=0), r["step"]
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5, abs=0), r["step"]
    assert len(got_val) == 1 and got_val == pytest.approx(ref_val, rel=1e-5, abs=0)
    assert [p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    # the sample runs on every process (fsdp-sharded parameters need both in its collectives); process 0 writes it
    assert (multi / "sample.txt").read_text().strip()


def last_rows(run_dir):
    """step -> the last logged row of that step (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    return rows


def test_kill_both_processes_and_resume_gives_the_uninterrupted_losses(micro, tmp_path):
    """SIGKILL both processes of a two-process run once a checkpoint is committed, rerun them: the resumed run
    starts from that checkpoint and every step's loss equals an uninterrupted run's."""
    steps = 40
    settings = {**micro, **MODEL, "mesh": {"fsdp": 2}, "steps": steps, "log_every": 1, "eval_every": 1000,
                "checkpoint_every": 4, "sample_tokens": 0}
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref = launch(settings, ref_dir, tmp_path / "reference.log", devices=2)

    def two_processes(tag):
        coordinator = f"localhost:{free_port()}"
        return {i: launch(settings, run_dir, tmp_path / f"{tag}{i}.log", devices=1, distributed=(coordinator, 2, i),
                          cache_dir=tmp_path / "jax-cache")
                for i in range(2)}

    procs = two_processes("first")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            ckpts = run_dir / "checkpoints"
            if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
                break
            time.sleep(0.02)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    procs = two_processes("resume")
    wait_all({**procs, "reference": ref}, TIMEOUT_S)
    for name, p in {**procs, "reference": ref}.items():
        assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{p.log.read_text()[-3000:]}"
    out = procs[0].log.read_text()
    resumed_from = int(out.split(f"resuming {run_dir} from step ")[1].split()[0])
    assert 4 <= resumed_from < steps
    want, got = last_rows(ref_dir), last_rows(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=0), s
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
