"""Bad training configs are one-line errors that name the key (and the nearest valid key for typos)."""

import pytest

from qwen35_jax.config import ConfigError
from qwen35_jax.train.config import load_train_config

BAD = [
    (["stpes=10"], "unknown key 'stpes' (did you mean 'steps'?)"),
    (["optimizer.lrr=1e-3"], "unknown key 'lrr' (did you mean 'lr'?)"),
    (["steps=0"], "steps must be positive"),
    (["steps=ten"], "key 'steps' must be a number"),
    (["steps=2.5"], "key 'steps' must be an integer"),
    (["batch_size=6", "optimizer.grad_accum=4"], "batch_size=6 is not divisible by optimizer.grad_accum=4"),
    (["precision=fp16"], "precision 'fp16' is not one of"),
    (["precision=fp8", "fp8.scaling=per_row"], "fp8.scaling 'per_row' is not one of"),
    (["fp8.atention=false"], "unknown key 'atention' (did you mean 'attention'?)"),
    (["fp8.mtp=maybe"], "key 'mtp' must be true/false"),
    (["optimizer.schedule=linear"], "optimizer.schedule 'linear' is not one of"),
    (["optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["nonfinite=ignore"], "nonfinite 'ignore' is not one of stop, skip"),
    (["tensorboard=maybe"], "key 'tensorboard' must be true/false"),
    (["model=tinny"], "unknown model preset 'tinny' (did you mean 'tiny'?)"),
    (["model.hidden_sise=8"], "did you mean 'hidden_size'"),
    (["seq_len=100000"], "seq_len=100000 exceeds the model's max_position_embeddings=8192"),
    (["mesh=4"], "mesh must be a mapping"),
    (["optimizer=3"], "key 'optimizer' must be a mapping"),
    (["steps"], "not of the form key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[o[0] for o, _ in BAD])
def test_bad_config_is_a_one_line_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown training config 'qwen3.5-35b'"):
        load_train_config("qwen3.5-35b")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_train_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_shipped_recipes_load():
    from qwen35_jax.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        cfg = load_train_config(str(path))
        assert cfg.steps > 0, path


def test_embedded_default_is_the_tiny_model_on_the_stdlib():
    cfg = load_train_config()
    assert cfg.model == "tiny" and cfg.data == {"kind": "stdlib"} and cfg.mtp_lambda == 0.1
