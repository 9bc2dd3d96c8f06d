"""The training loop end to end on a micro model: falling loss, telemetry files, exact resume, corrupt-checkpoint
fallback, refusing to start over unreadable checkpoints, non-finite losses, eval and the sample."""

import json
import shutil

import numpy as np
import pytest

from qwen35_jax.errors import UserError
from qwen35_jax.train.config import load_train_config
from qwen35_jax.train.main import eval_main, train


def run(micro, run_dir, **changes):
    settings = {**micro, "run_dir": str(run_dir), **{k.replace("__", "."): v for k, v in changes.items()}}
    return train(load_train_config(None, settings))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def full_run(micro, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    summary = run(micro, run_dir, steps=12, checkpoint_every=4, eval_every=6)
    return run_dir, summary


def test_run_writes_metrics_checkpoints_sample_and_loss_falls(full_run):
    run_dir, summary = full_run
    assert summary["status"] == "completed" and summary["step"] == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_imbalance", "mtp_loss", "mtp_accuracy"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert np.mean([r["loss"] for r in train_rows[-3:]]) < train_rows[0]["loss"] - 0.2
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
    assert (run_dir / "sample.txt").read_text().strip()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resume_reproduces_the_uninterrupted_loss_trajectory(full_run, micro, tmp_path):
    """Drop the last checkpoint of a finished run (as a crash after step 8 would): the rerun restores step 8 and
    the data iterator and must produce bit-identical losses for steps 9..12."""
    src, _ = full_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "metrics.jsonl").write_text("")
    summary = run(micro, run_dir, steps=12, checkpoint_every=4, eval_every=6)
    assert summary["start_step"] == 8
    assert losses(run_dir) == {s: l for s, l in losses(src).items() if s > 8}


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(full_run, micro, tmp_path, capsys):
    src, _ = full_run
    run_dir = tmp_path / "corrupt"
    shutil.copytree(src, run_dir)
    (run_dir / "metrics.jsonl").write_text("")
    state_files = [f for f in (run_dir / "checkpoints" / "12" / "state").rglob("*") if f.is_file()]
    for f in state_files:
        f.write_bytes(b"garbage")
    summary = run(micro, run_dir, steps=12, checkpoint_every=4, eval_every=6)
    out = capsys.readouterr().out
    assert "is corrupt or partial" in out and "/12" in out
    assert [p.name.split(".")[0] for p in (run_dir / "checkpoints.corrupt").iterdir()] == ["12"]  # kept aside
    assert summary["start_step"] == 8
    assert losses(run_dir) == {s: l for s, l in losses(src).items() if s > 8}


def test_refuses_to_start_over_unreadable_checkpoints(full_run, micro, tmp_path):
    src, _ = full_run
    run_dir = tmp_path / "unreadable"
    shutil.copytree(src, run_dir)
    for step in ("4", "8", "12"):
        for f in (run_dir / "checkpoints" / step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    with pytest.raises(UserError, match="refusing to start from scratch"):
        run(micro, run_dir, steps=12, checkpoint_every=4, eval_every=6)


def test_resume_with_a_different_model_is_refused(full_run, micro, tmp_path):
    src, _ = full_run
    run_dir = tmp_path / "other"
    shutil.copytree(src, run_dir)
    with pytest.raises(UserError, match="holds a run with a different 'model'"):
        run(micro, run_dir, steps=16, model__intermediate_size=96)


def test_eval_command_scores_the_newest_checkpoint(full_run, capsys):
    run_dir, summary = full_run
    assert eval_main([str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 12
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_is_reported_with_its_step(micro, tmp_path, policy):
    """lr=1e30 blows the parameters up after the first update, so step 2 has a non-finite loss."""
    run_dir = tmp_path / policy
    summary = run(micro, run_dir, steps=4, nonfinite=policy, optimizer__lr=1e30, optimizer__warmup_steps=0,
                  optimizer__clip_norm=1e30, checkpoint_every=100, eval_every=100, sample_tokens=0)
    log = (run_dir / "metrics.jsonl").read_text()
    if policy == "stop":
        assert summary["status"] == "nonfinite" and summary["step"] == 2
        assert "non-finite loss or gradients at step 2" in summary["error"]
        saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        assert saved == [1]  # the state the refused update would have changed
    else:
        assert summary["status"] == "completed" and summary["step"] == 4
    events = [json.loads(line) for line in log.splitlines() if "nonfinite" in line]
    assert events and events[0]["step"] == 2 and events[0]["nonfinite"] == 1


def test_generate_and_convert_restore_parameters_only_past_a_corrupt_newest(full_run, tmp_path, capsys):
    """`generate RUN_DIR` and `convert orbax-to-hf RUN_DIR` read the newest readable checkpoint's parameters (no
    optimizer state) through the run builder, report a corrupt newest one in a line, use the previous one, and move
    nothing."""
    import jax
    import orbax.checkpoint as ocp

    from qwen35_jax import hf
    from qwen35_jax.generate_cli import load_source
    from qwen35_jax.train.convert import convert_main

    src, _ = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    for f in (run_dir / "checkpoints" / "12" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # array data only: the metadata still reads
            f.write_bytes(b"garbage")
    with ocp.StandardCheckpointer() as c:  # orbax's own full restore of step 8, the expected parameters
        expected = c.restore((run_dir / "checkpoints" / "8" / "state").absolute())["params"]

    cfg, params, tokenizer = load_source(str(run_dir))
    err = capsys.readouterr().err
    assert err.count("is corrupt or partial") == 1 and "/checkpoints/12 is corrupt" in err
    assert jax.tree.structure(params) == jax.tree.structure(expected)  # parameters only, no AdamW moments
    # restored into the run builder's layout (its mesh and parameter shardings), not whole onto one device
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(params))
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))
    assert tokenizer.vocab_size == cfg.vocab_size
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "4", "8"]
    assert not (run_dir / "checkpoints.corrupt").exists()

    assert convert_main(["orbax-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "/checkpoints/12 is corrupt" in capsys.readouterr().out
    _, back = hf.load(tmp_path / "hf")
    assert all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(expected)))


def test_generate_cli_with_a_draft_vocabulary_from_the_runs_data(full_run, capsys):
    """`generate RUN --speculative mtp --draft-vocab N` counts token frequencies on the run's own training data,
    drafts among the N most frequent tokens and prints the same ids as plain greedy decoding."""
    from qwen35_jax.errors import run_cli
    from qwen35_jax.generate_cli import generate_main

    run_dir, _ = full_run
    base = [str(run_dir), "--prompt-ids", "5,9,17,30", "--max-new-tokens", "12", "--print-ids"]
    assert run_cli(lambda: generate_main(base)) == 0
    plain = capsys.readouterr().out.strip().splitlines()[-1]
    assert run_cli(lambda: generate_main(base + ["--speculative", "mtp", "--draft-tokens", "2",
                                                 "--draft-vocab", "64"])) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == plain
    assert "draft vocabulary: 64 of 512 tokens" in out.err and "MTP acceptance" in out.err
    assert run_cli(lambda: generate_main(base + ["--draft-vocab", "64"])) == 2
    err = capsys.readouterr().err
    assert "--draft-vocab restricts speculative drafts" in err and len(err.strip().splitlines()) == 1
