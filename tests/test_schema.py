"""The one config mechanism (qwen35_jax.schema): typed nested dataclasses from YAML + dotted overrides, one-line
errors naming the dotted key, docs as data; and that model, training and sweep configs all go through it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, Literal

import pytest

from qwen35_jax.config import ModelConfig, from_dict, load_config, to_dict
from qwen35_jax.schema import ConfigError, apply_overrides, build, describe, field, field_docs


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 3  # an int
    kind: Literal["a", "b"] = "a"  # a choice
    dims: tuple[int, ...] = (1, 2)  # a tuple
    scale: float | None = None  # optional float


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"  # a string
    flag: bool = False  # a bool
    inner: Inner = dataclasses.field(default_factory=Inner)  # a nested config
    extra: Inner | None = None  # an optional nested config, off by default
    table: dict[str, int] = dataclasses.field(default_factory=dict)  # a mapping
    spec: dict[str, Any] | str = "plain"  # a mapping or a string
    documented: int = field(7, doc="from metadata")


def test_nested_optional_dataclasses_and_new_fields_need_no_code():
    cfg = build(Outer, apply_overrides({"inner": {"size": "4"}}, ["extra.kind=b", "table={q: 2}", "flag=true",
                                                                  "inner.dims=[3, 4.0]", "inner.scale=1e-3"]))
    assert cfg.inner == Inner(size=4, dims=(3, 4), scale=1e-3) and cfg.extra == Inner(kind="b")
    assert cfg.table == {"q": 2} and cfg.flag is True and cfg.spec == "plain"
    assert build(Outer, {"extra": None, "spec": {"k": 1}}).spec == {"k": 1}
    assert to_dict(cfg)["inner"] == {"size": 4, "kind": "a", "dims": [3, 4], "scale": 1e-3}
    assert build(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"inner": {"sise": 1}}, "cfg: unknown key 'inner.sise' (did you mean 'inner.size'?)"),
    ({"extra": {"kind": "c"}}, "cfg: key 'extra.kind' must be one of a, b, got 'c'"),
    ({"inner": {"size": 2.5}}, "cfg: key 'inner.size' must be an integer, got 2.5"),
    ({"inner": {"dims": [1, "x"]}}, "cfg: key 'inner.dims[1]' must be an integer, got 'x'"),
    ({"inner": {"scale": "big"}}, "cfg: key 'inner.scale' must be a number or null, got 'big'"),
    ({"flag": 1}, "cfg: key 'flag' must be true/false, got 1"),
    ({"name": 3}, "cfg: key 'name' must be a string, got 3"),
    ({"table": {"q": "two"}}, "cfg: key 'table.q' must be an integer, got 'two'"),
    ({"extra": 5}, "cfg: key 'extra' must be a mapping or null, got 5"),
    ({"spec": 5}, "cfg: key 'spec' must be a mapping or a string, got 5"),
])
def test_type_errors_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError) as e:
        build(Outer, data, "cfg")
    assert str(e.value) == message


def test_docs_are_data():
    docs = field_docs(Outer)
    assert docs["size" if False else "inner"] == "a nested config" and docs["documented"] == "from metadata"
    rows = {k: (t, v, d) for k, t, v, d in describe(Outer)}
    assert rows["extra"] == ("Inner|null", None, "an optional nested config, off by default")
    assert rows["inner.kind"] == ("a|b", "a", "a choice") and "extra.kind" in rows


def test_every_config_key_has_a_doc():
    from experiments.sweep import LMSettings, MQARSettings, SweepConfig
    from qwen35_jax.train.config import OptimConfig, TrainConfig

    for cls in (ModelConfig, TrainConfig, OptimConfig, SweepConfig, MQARSettings, LMSettings):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a doc (end the line with a comment): {missing}"


def test_train_config_is_typed_and_nested():
    from qwen35_jax.train.config import OptimConfig, load_train_config

    cfg = load_train_config("qwen3.5-35b-a3b-v5p", ["model.remat=dots", "optimizer.lr=1e-4"])
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.optimizer, OptimConfig)
    assert cfg.model.name == "qwen3.5-35b-a3b" and cfg.model.remat == "dots" and cfg.model.num_experts == 256
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.grad_accum == 4  # the rest of the recipe's section stays
    # preset names, {base: ...} mappings and model.x overrides on the default preset
    assert load_train_config(None, ["model=replica-100m"]).model == load_config("replica-100m")
    based = load_train_config({"model": {"base": "tiny", "num_layers": 8}})
    assert based.model == load_config("tiny", num_layers=8) and based.model.name == "tiny"
    assert load_train_config(None, ["model.hidden_size=96"]).model == load_config("tiny", hidden_size=96)
    # a run record (config.json) reads back to the same config
    record = to_dict(cfg)
    assert load_train_config(record) == cfg


def test_model_config_round_trips_and_replace_is_checked():
    cfg = load_config("qwen3.5-397b-a17b")
    assert from_dict(to_dict(cfg)) == cfg and hash(from_dict(to_dict(cfg))) == hash(cfg)
    with pytest.raises(ConfigError, match="key 'remat' must be one of none, full, dots, dots_no_batch"):
        cfg.replace(remat="al")


def test_config_command_lists_every_key():
    from qwen35_jax.cli import config_keys
    from qwen35_jax.train.config import TrainConfig

    text = config_keys("train")
    keys = [line.split()[0] for line in text.splitlines()[1:]]
    expected = [k for k, *_ in describe(TrainConfig)]
    assert keys == expected and "model.gdn_chunk_size" in keys and "optimizer.grad_accum" in keys
    assert "tiny" in text.splitlines()[2]  # model.name: the embedded default's preset
    recipe = config_keys("train", "qwen3.5-35b-a3b-v5p")
    assert any(line.split()[:3] == ["optimizer.grad_accum", "int", "4"] for line in recipe.splitlines())
    assert "mqar.seq_lens" in config_keys("sweep") and "hidden_size" in config_keys("model")
    out = subprocess.run([sys.executable, "-m", "qwen35_jax.cli", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "optimizer.grad_accum" in out and "model.remat" in out
