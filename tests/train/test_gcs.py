"""A run whose recipe YAML, run_dir, data and tokenizer are on gs://, against a GCS emulator on loopback started here
(gcp-storage-emulator): everything lands in the bucket (checkpoints through orbax/tensorstore, the rest through
paths.py/gcsfs), no local `gs:` folder appears, the recipe's `data.path: gs://.../train/*.array_record` glob reads
the ArrayRecord shards from the bucket, and a rerun resumes from the bucket's checkpoint with the same losses."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.cpu_env import cpu_env
from tests.train.conftest import REPO, overrides
from tests.train.test_distributed import MODEL, free_port

BUCKET = "qwen35-test"
TIMEOUT_S = 300


def _wait_for_port(port: int, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError("the GCS emulator did not start")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment for gcsfs (STORAGE_EMULATOR_HOST) and tensorstore (TENSORSTORE_GCS_HTTP_URL;
    GOOGLE_AUTH_TOKEN_FOR_TESTING skips its credential lookup), set in this process and passed to children."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.train.gcs_emulator", "start", "--in-memory", "--host",
                             "127.0.0.1", "--port", str(port), "--default-bucket", BUCKET, "-q"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait_for_port(port, proc)
        os.environ.update(env)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)


def _stage_data(micro, tmp_path):
    """The micro corpus as two text ArrayRecord shards and the tokenizer, uploaded to the bucket."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from qwen35_jax import paths

    texts = [p.read_text() for p in sorted(paths.path(micro["data"]["path"]).iterdir())]
    for i in range(2):
        local = tmp_path / f"shard-{i}.array_record"
        w = ArrayRecordWriter(str(local), "group_size:1")
        for t in texts[i::2]:
            w.write(t.encode())
        w.close()
        paths.path(f"gs://{BUCKET}/data/train/shard-{i}.array_record").write_bytes(local.read_bytes())
    paths.path(f"gs://{BUCKET}/data/README").write_text("not a shard: the glob must not pick it up")
    paths.path(f"gs://{BUCKET}/tok/tokenizer.model").write_bytes(paths.path(micro["tokenizer"]).read_bytes())
    return len(texts)


def _train(settings, cwd, env, log, config=None):
    env = {**cpu_env(), **env,
           "QWEN35_CACHE": str(cwd / "cache"), "JAX_COMPILATION_CACHE_DIR": str(cwd / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "qwen35_jax.cli", "train", *([config] if config else []),
                               *overrides(settings)], cwd=cwd,
                              env=env, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def _rows(text):
    rows = [json.loads(line) for line in text.splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


def test_gs_run_dir_data_glob_and_resume(gcs, micro, tmp_path):
    import yaml

    from qwen35_jax import paths

    n_docs = _stage_data(micro, tmp_path)
    run = f"gs://{BUCKET}/runs/r1"
    # the recipe itself is a YAML file in the bucket, as a pod launch reads it; the micro model as overrides
    recipe = {"data": {"kind": "array_record", "path": f"gs://{BUCKET}/data/train/*.array_record"},
              "tokenizer": f"gs://{BUCKET}/tok/tokenizer.model", "run_dir": run, "steps": 4,
              "checkpoint_every": 2, "eval_every": 4, "tensorboard": True}
    recipe_path = f"gs://{BUCKET}/configs/recipe.yaml"
    paths.path(recipe_path).write_text(yaml.safe_dump(recipe))
    settings = {k: v for k, v in {**micro, **MODEL}.items() if k not in ("eval_data", *recipe)}
    _train({**settings, "sample_tokens": 4}, tmp_path, gcs, tmp_path / "first.log", config=recipe_path)
    fs = _fs()
    bucket_run = f"{BUCKET}/runs/r1"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(bucket_run)}
    assert {"config.json", "summary.json", "metrics.jsonl", "sample.txt", "tensorboard", "checkpoints"} <= names
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket_run}/tensorboard")][0].startswith("events.out.tfevents")
    steps = sorted(int(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{bucket_run}/checkpoints") if p[-1].isdigit())
    assert steps == [2, 4]
    assert json.loads(fs.cat(f"{bucket_run}/summary.json"))["status"] == "completed"
    first, val = _rows(fs.cat(f"{bucket_run}/metrics.jsonl").decode())
    assert sorted(first) == [1, 2, 3, 4] and len(val) == 1 and val[0]["val_loss"] > 0
    assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())  # nothing local named after the URI
    config = json.loads(fs.cat(f"{bucket_run}/config.json"))
    assert config["run_dir"] == run
    staged = list((tmp_path / "cache" / "staged").rglob("*.array_record"))
    assert len(staged) == 2  # shards read from the bucket (staged once per host), README not matched

    # resume from the bucket: drop the newest checkpoint as a crash after step 2 would
    fs.rm(f"{bucket_run}/checkpoints/4", recursive=True)
    fs.pipe(f"{bucket_run}/metrics.jsonl", b"")
    out = _train({**settings, "sample_tokens": 0}, tmp_path, gcs, tmp_path / "resume.log", config=recipe_path)
    assert f"resuming {run} from step 2" in out
    resumed, _ = _rows(_fs().cat(f"{bucket_run}/metrics.jsonl").decode())
    assert resumed == {s: v for s, v in first.items() if s > 2}
    assert n_docs > 2


def test_params_only_restore_and_glob_errors_on_gs(gcs, micro, tmp_path):
    """Parameters from a gs:// run directory without the optimizer state; a glob with no match names it; a missing
    or malformed YAML recipe on gs:// is a one-line error naming it."""
    import jax
    import jax.numpy as jnp

    from qwen35_jax import paths
    from qwen35_jax.data.sources import document_source
    from qwen35_jax.errors import UserError
    from qwen35_jax.schema import ConfigError
    from qwen35_jax.train.checkpoint import Checkpointer
    from qwen35_jax.train.config import load_train_config

    ckpt = Checkpointer(f"gs://{BUCKET}/small/checkpoints", async_save=False)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "opt_state": {"mu": jnp.ones((2, 3))}}
    ckpt.save(1, state, meta={"step": 1})
    ckpt.close()
    reader = Checkpointer(f"gs://{BUCKET}/small/checkpoints", read_only=True)
    step, params, _, _ = reader.restore_latest({"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, params_only=True)
    reader.close()
    assert step == 1 and list(params) == ["w"] and (params["w"] == state["params"]["w"]).all()
    assert paths.glob(f"gs://{BUCKET}/small/checkpoints/*")
    with pytest.raises(ConfigError, match=rf"training config file 'gs://{BUCKET}/configs/missing.yaml' does not"):
        load_train_config(f"gs://{BUCKET}/configs/missing.yaml")
    paths.path(f"gs://{BUCKET}/configs/list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"gs://{BUCKET}/configs/list.yaml: expected a mapping"):
        load_train_config(f"gs://{BUCKET}/configs/list.yaml")
    with pytest.raises(UserError, match=r"no files match '\*.array_record' under gs://"):
        document_source({"kind": "array_record", "path": f"gs://{BUCKET}/nothing/*.array_record"})
