"""A micro training setup: a few files of this repository's Python as data, a 512-token sentencepiece model, and the
tiny preset shrunk so each compile takes seconds."""

from pathlib import Path

import pytest

from qwen35_jax.data import tokenizer as tk

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    train, valid = root / "train", root / "valid"
    train.mkdir(), valid.mkdir()
    files = sorted((REPO / "qwen35_jax").rglob("*.py"))
    for i, f in enumerate(files):
        (valid if i % 8 == 0 else train).joinpath(f"{i:03d}.txt").write_text(f.read_text())
    texts = [f.read_text() for f in sorted(train.iterdir())]
    tk.train_sentencepiece(texts[:12], root / "sp", vocab_size=512)
    return {
        "model.vocab_size": 512, "model.hidden_size": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
        "model.head_dim": 16, "model.gdn_num_key_heads": 1, "model.gdn_num_value_heads": 2, "model.gdn_key_dim": 16,
        "model.gdn_value_dim": 16, "model.num_experts": 4, "model.experts_per_token": 2,
        "model.moe_intermediate_size": 32, "model.shared_expert_intermediate_size": 32,
        "model.intermediate_size": 64,
        "data": {"kind": "text", "path": str(train), "split": "all"},
        "eval_data": {"kind": "text", "path": str(valid), "split": "all"},
        "tokenizer": str(root / "sp.model"),
        "batch_size": 4, "seq_len": 32, "steps": 6, "log_every": 1, "eval_every": 3, "eval_batches": 2,
        "checkpoint_every": 3, "sample_tokens": 8, "tensorboard": False, "precision": "fp32",
        "optimizer.warmup_steps": 2, "optimizer.lr": 1e-2,
    }


def overrides(settings: dict, **changes) -> list[str]:
    """key=value strings (mappings as YAML flow) for load_train_config / the CLI."""
    import yaml

    merged = {**settings, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            if isinstance(v, dict) else f"{k}={v}" for k, v in merged.items()]
