"""Bad training configs are one-line errors that name the key (and the nearest valid key for typos)."""

import pytest

from qwen35_jax.config import ConfigError
from qwen35_jax.train.config import load_train_config

BAD = [
    (["stpes=10"], "unknown key 'stpes' (did you mean 'steps'?)"),
    (["optimizer.lrr=1e-3"], "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    (["steps=0"], "steps must be positive"),
    (["steps=ten"], "key 'steps' must be an integer, got 'ten'"),
    (["steps=2.5"], "key 'steps' must be an integer"),
    (["batch_size=6", "optimizer.grad_accum=4"], "batch_size=6 is not divisible by optimizer.grad_accum=4"),
    (["precision=fp16"], "key 'precision' must be one of auto, fp32, bf16, fp8, got 'fp16'"),
    (["fp8.scaling=per_row"], "key 'fp8.scaling' must be one of per_channel, per_tensor, per_block, got 'per_row'"),
    (["fp8.atention=false"], "unknown key 'fp8.atention' (did you mean 'fp8.attention'?)"),
    (["fp8.mtp=maybe"], "key 'fp8.mtp' must be true/false"),
    (["fp8.block=0"], "fp8.block must be positive, got 0"),
    (["optimizer.schedule=linear"], "key 'optimizer.schedule' must be one of cosine, wsd, constant, got 'linear'"),
    (["optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["nonfinite=ignore"], "key 'nonfinite' must be one of stop, skip, got 'ignore'"),
    (["tensorboard=maybe"], "key 'tensorboard' must be true/false"),
    (["model=tinny"], "unknown model preset 'tinny' (did you mean 'tiny'?)"),
    (["model.hidden_sise=8"], "unknown key 'model.hidden_sise' (did you mean 'model.hidden_size'?)"),
    (["model.gdn_impl=palas"], "key 'model.gdn_impl' must be one of auto, xla, pallas, recurrent, got 'palas'"),
    (["model.moe_impl=cuda"], "key 'model.moe_impl' must be one of auto, xla, pallas, reference, got 'cuda'"),
    (["model.gdn_chunk_size=48"], "gdn_chunk_size=48 is not a power of two"),
    (["model.num_heads=0"], "num_heads must be positive, got 0"),
    (["model.gdn_key_dim=0"], "gdn_key_dim must be positive, got 0"),
    (["mesh={tensr: 2}"], "mesh axis 'tensr' is unknown (did you mean 'tensor'?); axes: data, fsdp, tensor, expert"),
    (["mesh={fsdp: 0}"], "mesh axis 'fsdp' has size 0"),
    (["mesh={fsdp: -1, data: -1}"], "only one axis may be -1"),
    (["mesh={fsdp: two}"], "key 'mesh.fsdp' must be an integer, got 'two'"),
    (["seq_len=100000"], "seq_len=100000 exceeds the model's max_position_embeddings=8192"),
    (["mesh=4"], "key 'mesh' must be a mapping, got 4"),
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
    assert cfg.model.name == "tiny" and cfg.data == {"kind": "stdlib"} and cfg.mtp_lambda == 0.1
