"""The sweep runner end to end: a two-variant MQAR micro sweep (results, table, plots, resume), a one-variant LM
micro sweep through the trainer (loss curves, attention-sink share), sharding, and one-line config errors."""

import csv
from pathlib import Path

import pytest

from experiments import ablate
from experiments.ablate import ablate_main
from experiments.report import CSV_COLUMNS
from experiments.sweep import build_sweep, load_sweep, spec_defaults, spec_difference
from qwen35_jax.config import ConfigError
from qwen35_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


def test_micro_mqar_sweep_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "micro"
    argv = ["micro", f"out_dir={out}"]
    assert ablate_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("ETA" in line for line in lines) == 4  # one progress line per run

    columns, rows = read_csv(out / "results.csv")
    assert columns == CSV_COLUMNS
    acc = [r for r in rows if r["metric"] == "accuracy@T=32"]
    assert sorted((r["variant"], float(r["lr"])) for r in acc) == [("attention", 3e-3), ("attention", 1e-2),
                                                                   ("linear", 3e-3), ("linear", 1e-2)]
    assert all(r["experiment"] == "micro" and r["task"] == "mqar" and 0 <= float(r["value"]) <= 1 for r in acc)
    state = {r["variant"]: int(r["state_size"]) for r in acc}
    assert state["attention"] == 2 * 1 * 16 * 32  # K and V, 1 kv head of dim 16, 32 positions, 1 layer
    assert state["linear"] == 2 * 16 * 16 + 3 * (2 * 1 * 16 + 2 * 16)  # 2 value heads of 16x16 + 3 conv columns
    profiled = {(r["variant"], r["metric"]) for r in rows if r["lr"] == ""}
    assert ("linear", "compiled_memory_bytes@T=32") in profiled and ("attention", "train_tokens_per_s@T=32") in profiled

    recall = [r for r in rows if r["metric"] == "recall_step@T=32"]  # from each run's curve: a step or NaN
    assert len(recall) == 4 and all(r["value"] == "nan" or 0 < float(r["value"]) <= 6 for r in recall)
    md = (out / "results.md").read_text()
    assert "| attention |" in md and "| linear |" in md and "4 of 4 runs finished" in md
    assert "recall from step" in md
    for name in ("mqar_accuracy_vs_state_size.png", "mqar_loss_curves.png", "throughput_vs_seq_len.png",
                 "memory_vs_seq_len.png"):
        assert (out / name).stat().st_size > 1000, name

    # A rerun trains nothing and profiles nothing: every run and profile is read back from its file.
    monkeypatch.setattr(ablate, "execute", lambda *a, **k: pytest.fail("a finished run ran again"))
    monkeypatch.setattr("experiments.throughput.profile_train_step",
                        lambda *a, **k: pytest.fail("a finished profile ran again"))
    assert ablate_main(argv) == 0
    assert capsys.readouterr().out.count("skipped, done earlier") == 4
    assert read_csv(out / "results.csv")[1] == rows

    # A changed setting is not silently mixed with old results.
    with pytest.raises(UserError, match="different 'settings.steps'"):
        ablate_main(argv + ["mqar.steps=7"])


def test_seeds_are_a_sweep_axis(tmp_path, capsys):
    """`seeds=[...]`: one run per seed (seed 0 keeps the id runs had before), the seed in the spec, the record and a
    results.csv column; the tables give each seed's best over learning rates, then mean [min, max] over seeds."""
    out = tmp_path / "seeds"
    argv = ["micro", f"out_dir={out}", "seeds=[0, 1]", "profile_seq_lens=[]"]
    sweep = load_sweep(argv[0], argv[1:])
    assert [(r.run_id, r.seed, r.spec["seed"]) for r in sweep.runs if r.variant == "linear"] == [
        ("linear.T32.lr3e-3", 0, 0), ("linear.T32.lr3e-3.s1", 1, 1),
        ("linear.T32.lr1e-2", 0, 0), ("linear.T32.lr1e-2.s1", 1, 1)]
    assert ablate_main(argv) == 0
    capsys.readouterr()
    columns, rows = read_csv(out / "results.csv")
    assert columns == CSV_COLUMNS
    acc = [r for r in rows if r["metric"] == "accuracy@T=32"]
    assert sorted((r["variant"], r["lr"], r["seed"]) for r in acc) == sorted(
        (v, lr, s) for v in ("attention", "linear") for lr in ("0.003", "0.01") for s in ("0", "1"))
    loss = {r["seed"]: float(r["value"]) for r in rows if r["metric"] == "train_loss@T=32" and r["variant"] == "linear"
            and r["lr"] == "0.01"}
    assert loss["0"] != loss["1"]  # the seeds really differ (initial weights and data)
    md = (out / "results.md").read_text()
    assert "seeds 0, 1" in md
    for variant in ("attention", "linear"):
        best = [max(float(r["value"]) for r in acc if r["variant"] == variant and r["seed"] == s) for s in "01"]
        want = f"{sum(best) / 2:,.4f} [{min(best):,.4f}, {max(best):,.4f}] (2)"
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant} | ") and "(2)" in line)
        assert want in row, (row, want)
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep("micro", ["seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep("micro", ["seed=3"])  # the old key is an error naming the new one, not ignored


def test_micro_lm_sweep_trains_and_measures_the_sink(tmp_path, capsys):
    from qwen35_jax.data import tokenizer as tk

    train, valid = tmp_path / "train", tmp_path / "valid"
    train.mkdir(), valid.mkdir()
    for i, f in enumerate(sorted((REPO / "qwen35_jax").rglob("*.py"))[:24]):
        (valid if i % 8 == 0 else train).joinpath(f"{i:03d}.txt").write_text(f.read_text())
    tk.train_sentencepiece([f.read_text() for f in sorted(train.iterdir())], tmp_path / "sp", vocab_size=512)
    out = tmp_path / "lm"
    assert ablate_main(["micro_lm", f"out_dir={out}", "model.vocab_size=512", f"lm.tokenizer={tmp_path}/sp.model",
                        f"lm.data={{kind: text, path: {train}, split: all}}",
                        f"lm.train.eval_data={{kind: text, path: {valid}, split: all}}"]) == 0
    capsys.readouterr()
    columns, rows = read_csv(out / "results.csv")
    assert columns == CSV_COLUMNS
    metrics = {r["metric"]: float(r["value"]) for r in rows}
    assert set(metrics) == {"val_loss", "tokens_per_s", "attention_sink_share"}
    assert 0 < metrics["val_loss"] < 10 and 0 < metrics["attention_sink_share"] < 1
    assert (out / "lm_loss_curves.png").stat().st_size > 1000
    assert (out / "runs" / "attention.lr1e-2" / "metrics.jsonl").exists()


def test_shards_split_the_grid(capsys):
    sweep = load_sweep("mqar_4layer", ["lrs=[1e-3, 3e-3, 1e-2]"])
    assert ablate_main(["mqar_4layer", "lrs=[1e-3, 3e-3, 1e-2]", "--list", "--shard", "1/5"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [r.run_id for r in sweep.runs[1::5]]
    assert len({r.run_id for r in sweep.runs}) == len(sweep.runs) == 9 * 3 * 3  # variants x lengths x lrs


def test_a_field_added_after_a_run_was_recorded_matches_only_at_its_default():
    run = load_sweep("mqar_4layer").runs[0]
    old = {**run.spec, "model": {k: v for k, v in run.spec["model"].items() if k != "attention_impl"}}
    assert run.spec["model"]["attention_impl"] == "auto"
    assert spec_difference(old, run.spec, spec_defaults()) is None
    assert spec_difference(old, run.spec) == "model.attention_impl"  # without defaults: any missing key differs
    changed = {**run.spec, "model": {**run.spec["model"], "attention_impl": "xla_dense"}}
    assert spec_difference(old, changed, spec_defaults()) == "model.attention_impl"
    assert spec_difference(run.spec, {**run.spec, "lr": 1.0}, spec_defaults()) == "lr"
    settings = {k: v for k, v in run.spec["settings"].items() if k != "lr_schedule"}  # recorded before the field
    assert run.spec["settings"]["lr_schedule"] == "cosine"
    assert spec_difference({**run.spec, "settings": settings}, run.spec, spec_defaults("mqar")) is None
    wsd = {**run.spec, "settings": {**run.spec["settings"], "lr_schedule": "wsd"}}
    assert spec_difference({**run.spec, "settings": settings}, wsd, spec_defaults("mqar")) == "settings.lr_schedule"
    # a field whose default is None (added with train_kv_pairs): a run recorded before it matches at the default
    no_mix = {k: v for k, v in run.spec["settings"].items() if k != "train_kv_pairs"}
    assert run.spec["settings"]["train_kv_pairs"] is None
    assert spec_difference({**run.spec, "settings": no_mix}, run.spec, spec_defaults("mqar")) is None
    mixed = {**run.spec, "settings": {**run.spec["settings"], "train_kv_pairs": [4, 8]}}
    assert spec_difference({**run.spec, "settings": no_mix}, mixed, spec_defaults("mqar")) == "settings.train_kv_pairs"
    # how the step compiles (layers scanned or unrolled, remat) does not make a recorded run stale
    unrolled = {**run.spec, "model": {**run.spec["model"], "scan_layers": False, "remat": "full"}}
    assert spec_difference(run.spec, unrolled, spec_defaults()) is None


def test_several_pair_counts_per_length_are_a_sweep_axis(tmp_path, capsys):
    """`mqar.num_kv_pairs: [2, 4]`: one run per count (the count in the id and the run's settings), and tables,
    metrics and plots keep the settings apart; a single count keeps the ids recorded runs have."""
    out = tmp_path / "kv"
    argv = ["micro", f"out_dir={out}", "variants={linear: L}", "lrs=[1e-2]", "mqar.num_kv_pairs=[2, 4]",
            "profile_seq_lens=[]"]
    sweep = load_sweep(argv[0], argv[1:])
    assert [(r.run_id, r.spec["settings"]["num_kv_pairs"]) for r in sweep.runs] == [
        ("linear.T32.kv2.lr1e-2", 2), ("linear.T32.kv4.lr1e-2", 4)]
    assert [r.run_id for r in load_sweep("micro", ["variants={linear: L}", "lrs=[1e-2]"]).runs] == ["linear.T32.lr1e-2"]
    assert ablate_main(argv) == 0
    capsys.readouterr()
    _, rows = read_csv(out / "results.csv")
    assert {r["metric"] for r in rows if r["metric"].startswith("accuracy@")} == {"accuracy@T=32,kv=2",
                                                                                 "accuracy@T=32,kv=4"}
    md = (out / "results.md").read_text()
    assert "| variant | params | T=32,kv=2 | T=32,kv=4 |" in md
    assert sum(line.startswith("| linear | 32 | 2 |") or line.startswith("| linear | 32 | 4 |")
               for line in md.splitlines()) == 2
    with pytest.raises(ConfigError, match="mqar.num_kv_pairs"):
        load_sweep("micro", ["mqar.num_kv_pairs=[4, 4]"])
    with pytest.raises(ConfigError, match="mqar.num_kv_pairs"):
        load_sweep("micro", ["mqar.num_kv_pairs=[4, 9]"])  # 9 pairs need T >= 36


@pytest.mark.parametrize("change, key", [
    ({"lrs": []}, "lrs"),
    ({"variantz": {}}, "variantz"),
    ({"task": "vision"}, "task"),
    ({"variants": {"x": "GQ"}}, "variants.x"),
    ({"variants": {"x": {"attn_output_gate": "none"}}}, "variants.x"),
    ({"mqar": {"seq_lens": [32], "num_kv_pairs": 9}}, "mqar.num_kv_pairs"),
    ({"mqar": {"step": 3}}, "mqar.step"),
    ({"mqar": {"seq_lens": [32], "train_kv_pairs": [2, 9]}}, "mqar.train_kv_pairs"),
    ({"mqar": {"train_kv_pairs": []}}, "mqar.train_kv_pairs"),
    ({"match_params": "nope"}, "match_params.to"),
    ({"model": {"base": "tiny", "hidden_sise": 8}}, "hidden_sise"),
])
def test_bad_sweep_configs_name_the_key(change, key):
    base = {"experiment": "x", "task": "mqar", "variants": {"a": "F"}, "lrs": [1e-3]}
    with pytest.raises(ConfigError, match=key) as e:
        build_sweep({**base, **change})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "configs" / "ablate").glob("*.yaml")))
def test_every_sweep_config_builds_and_still_owns_its_recorded_runs(config):
    """A committed sweep config builds, and every recorded result in its out_dir is a run of its grid with the same
    spec: `qwen35 ablate CONFIG` reuses them instead of training again (or refusing a stale result)."""
    from experiments.ablate import finished

    sweep = load_sweep(config)
    assert len({r.run_id for r in sweep.runs}) == len(sweep.runs)
    runs = {r.run_id: r for r in sweep.runs}
    recorded = sorted((REPO / sweep.out_dir / "runs").glob("*/result.json"))
    for path in recorded:
        run_id = path.parent.name
        assert run_id in runs, f"{path}: not a run of configs/ablate/{config}.yaml"
        assert finished(sweep, runs[run_id]) is not None  # raises, naming the key, on a spec that differs


@pytest.mark.parametrize("results", sorted(p.parent.name for p in (REPO / "experiments" / "results").glob("*/results.md")))
def test_every_recorded_results_directory_is_rebuilt_by_the_command_it_names(results):
    """Each recorded results.md names the `qwen35 ablate` command that rebuilds it (`--report-only`); that command,
    with today's configs, still builds a grid that owns every run in the directory, with the same spec (a config
    edited or renamed without updating the recorded command is caught here)."""
    import re
    import shlex

    from experiments.ablate import finished

    directory = REPO / "experiments" / "results" / results
    produced = re.search(r"Produced by `qwen35 ablate ([^`]+)`", (directory / "results.md").read_text())
    assert produced, f"{directory}/results.md: no 'Produced by `qwen35 ablate ...`' line"
    config, *overrides = shlex.split(produced.group(1))
    sweep = load_sweep(config, overrides)
    assert (REPO / sweep.out_dir).resolve() == directory.resolve(), f"{produced.group(1)}: writes {sweep.out_dir}"
    runs = {r.run_id: r for r in sweep.runs}
    recorded = sorted((directory / "runs").glob("*/result.json"))
    assert recorded, f"{directory}: no recorded runs"
    for path in recorded:
        assert path.parent.name in runs, f"{path}: not a run of `qwen35 ablate {produced.group(1)}`"
        assert finished(sweep, runs[path.parent.name]) is not None


def test_a_sweep_file_with_a_base_is_the_base_with_its_keys_merged_over(tmp_path):
    """`base: SWEEP`: mappings merge key by key (variants, the task section), other values replace, and the
    file writes to its own experiment's folder; a missing experiment, a cycle and a bad base are one-line errors."""
    child = tmp_path / "child.yaml"
    child.write_text("base: micro\nexperiment: child\nvariants: {linear: {layer_pattern: L, initializer_range: 0.1}}\n"
                     "lrs: [1e-2]\nmqar: {steps: 4}\n")
    sweep = load_sweep(str(child))
    same = load_sweep("micro", ["experiment=child", "out_dir=experiments/results/child", "lrs=[1e-2]", "mqar.steps=4",
                                "variants={attention: F, linear: {layer_pattern: L, initializer_range: 0.1}}"])
    assert [(r.run_id, r.spec) for r in sweep.runs] == [(r.run_id, r.spec) for r in same.runs]
    assert sweep.out_dir == same.out_dir and sweep.settings == same.settings
    assert sweep.settings["vocab_size"] == 64 and sweep.settings["steps"] == 4  # merged, not replaced
    assert load_sweep(str(child), ["mqar.steps=5"]).settings["steps"] == 5  # overrides apply after the merge
    for text, message in [
        ("base: micro\nlrs: [1e-2]\n", r"child.yaml: key 'experiment' is required with 'base'"),
        (f"base: {child}\nexperiment: loop\n", r"child.yaml: key 'base': .* leads back to this file"),
        ("base: [micro]\nexperiment: x\n", r"child.yaml: key 'base' must be a sweep name or YAML path"),
        ("base: micrp\nexperiment: x\n", r"unknown sweep 'micrp' \(did you mean 'micro'\?\)"),
    ]:
        child.write_text(text)
        with pytest.raises(ConfigError, match=message) as e:
            load_sweep(str(child))
        assert "\n" not in str(e.value)
