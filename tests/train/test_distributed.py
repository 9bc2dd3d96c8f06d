"""Two `qwen35 train` processes joined by `jax.distributed` on localhost (one CPU device each) train exactly like
one process over two devices: the same global batches, losses, gradient norms and validation loss, with parameters
fsdp-sharded across the processes, and orbax saves the final checkpoint from both. Killed and resumed over a corrupt
newest checkpoint (corrupt in process 0's shards only), both processes fall back to the same older one, process 0
alone sets the corrupt one aside, and the losses are those of an uninterrupted run."""

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.cpu_env import cpu_env
from tests.train.conftest import overrides

TIMEOUT_S = 240
# Compile time dominates on a 2-core CPU: one attention layer without MTP compiles ~3x faster than the micro stack
# (GDN, MTP and the mixes are covered by the one-process mesh tests).
MODEL = {"model.num_layers": 1, "model.layer_pattern": "A", "model.mtp_num_layers": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(settings, run_dir, log, devices, distributed=(), cache_dir=None):
    env = cpu_env(devices)
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
    """SIGKILL both processes of a two-process run once two checkpoints are committed, write garbage into the newest
    one's array data (process 0's shards only: process 1 can read its own), rerun them: both processes agree that
    it is corrupt and resume from the older one, process 0 alone moves the corrupt step aside (one copy), and every
    step's loss equals an uninterrupted run's."""
    steps = 40
    settings = {**micro, **MODEL, "mesh": {"fsdp": 2}, "steps": steps, "log_every": 1, "eval_every": 1000,
                "checkpoint_every": 4, "sample_tokens": 0}
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    ref = launch(settings, ref_dir, tmp_path / "reference.log", devices=2)

    def two_processes(tag):
        coordinator = f"localhost:{free_port()}"
        return {i: launch(settings, run_dir, tmp_path / f"{tag}{i}.log", devices=1, distributed=(coordinator, 2, i),
                          cache_dir=tmp_path / "jax-cache")
                for i in range(2)}

    def committed():
        return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []

    procs = two_processes("first")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            if len(committed()) >= 2:
                break
            time.sleep(0.02)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    *_, older, newest = committed()
    shards = [f for f in (ckpts / str(newest) / "state").rglob("*")
              if f.is_file() and f.parent.name == "d" and "process_1" not in str(f.relative_to(ckpts))]
    assert shards, sorted(str(f) for f in (ckpts / str(newest)).rglob("*"))
    for f in shards:
        f.write_bytes(b"garbage")
    procs = two_processes("resume")
    wait_all({**procs, "reference": ref}, TIMEOUT_S)
    for name, p in {**procs, "reference": ref}.items():
        assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{p.log.read_text()[-3000:]}"
    out = procs[0].log.read_text()  # process 0 alone logs
    assert f"checkpoint {ckpts / str(newest)} is corrupt or partial" in out, out[-3000:]
    assert "moved the unreadable checkpoint" in out
    # one copy set aside (a second mover would fail on the missing folder or leave a second entry); both processes
    # resumed from the older step (one at `newest` would desynchronise the collectives and the losses below)
    assert [p.name.split(".")[0] for p in (run_dir / "checkpoints.corrupt").iterdir()] == [str(newest)]
    assert int(out.split(f"resuming {run_dir} from step ")[1].split()[0]) == older
    want, got = last_rows(ref_dir), last_rows(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for s in want:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=0), s
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
