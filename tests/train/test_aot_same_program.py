"""`qwen35 aot` compiles the program `qwen35 train` runs: both go through the run builder (train/run.py), and the
StableHLO `train` lowers for its first real step (state from init, batch from the data pipeline) is identical to
what `aot` lowers from abstract inputs, on a 4-device fake CPU mesh with fsdp, data parallelism and grad_accum."""

import json
import subprocess
import sys
import textwrap

from tests.cpu_env import cpu_env
from tests.train.conftest import REPO, overrides

SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys
    import jax
    from qwen35_jax.train import main as train_main
    from qwen35_jax.train.aot import lower_train_step
    from qwen35_jax.train.config import load_train_config

    tcfg = load_train_config(None, json.loads(sys.argv[1]))
    seen, build = {}, train_main.build_run

    class Stop(Exception):
        pass

    def spy(cfg, devices=None):  # the trainer's own Run, its step replaced by one that records the lowering
        run = build(cfg, devices)
        def first_step(state, batch):
            seen["train"] = run.train_step.lower(state, batch).as_text()
            raise Stop
        return dataclasses.replace(run, train_step=first_step)

    train_main.build_run = spy
    try:
        train_main.train(tcfg)
    except Stop:
        pass
    run, lowered = lower_train_step(tcfg, jax.devices(), target=None)
    aot = lowered.as_text()
    print(json.dumps({"same": seen["train"] == aot, "chars": len(aot), "mesh": dict(run.mesh.shape),
                      "sharded": aot.count("sharding"), "first_diff": next(
                          (i for i, (a, b) in enumerate(zip(seen["train"], aot)) if a != b), None)}))
''')


def test_aot_lowers_the_same_stablehlo_as_train(micro, tmp_path):
    settings = overrides(micro, run_dir=str(tmp_path / "run"), mesh={"data": 2, "fsdp": 2},
                         optimizer__grad_accum=2, steps=2)
    env = cpu_env(4)
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(settings)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 1, "sequence": 1}
    assert r["sharded"] > 10 and r["chars"] > 10000, r  # a real, sharded program
    assert r["same"], f"train and aot lowerings differ at character {r['first_diff']}"
