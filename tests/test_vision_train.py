"""Image-text training: the embedded shapes set and JSONL records become rows with placeholder runs, mRoPE positions
and per-row vision arrays; the train step learns from the pixels; parameter counts include the tower; `qwen35 aot`
compiles the train step with the tower."""

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from qwen35_jax.config import load_config
from qwen35_jax.data import multimodal as mm
from qwen35_jax.errors import UserError
from qwen35_jax.model import init_params
from qwen35_jax.vision_config import VisionConfig
from qwen35_jax.vision_grid import rope_index

TINY = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "num_position_embeddings": 16}


def test_shapes_rows():
    tok = mm.shapes_tokenizer()
    v = VisionConfig(**TINY, **tok.vision_ids())
    b = next(mm.batches(mm.ShapesSource(100), tok, v, batch_size=3, seq_len=16, image_size=64))
    assert b["tokens"].shape == (3, 16) and b["positions"].shape == (3, 3, 16)
    assert b["vision"]["pixels"].shape == (3, 16, v.patch_dim) and b["vision"]["frame"].shape == (3, 16)
    for r in range(3):
        row = b["tokens"][r]
        assert row[0] == v.vision_start_token_id and (row[1:5] == v.image_token_id).all()
        assert row[5] == v.vision_end_token_id
        np.testing.assert_array_equal(b["positions"][r], rope_index(v, row[None], [(1, 4, 4)], None,
                                                                    b["segment_ids"][r:r + 1])[0][:, 0])
        n = int(b["segment_ids"][r].sum())
        # the loss covers the caption words and the end token, never the image placeholders
        assert b["loss_mask"][r, :5].sum() == 0 and b["loss_mask"][r, 5:n].all() and b["targets"][r, n - 1] == 1
        assert tok.decode(b["targets"][r, 5:n]).startswith("a ")
    again = next(mm.batches(mm.ShapesSource(100), tok, v, batch_size=3, seq_len=16, image_size=64))
    np.testing.assert_array_equal(again["vision"]["pixels"], b["vision"]["pixels"])


def test_jsonl_records_and_errors(tmp_path):
    tok = mm.shapes_tokenizer()
    v = VisionConfig(**TINY, **tok.vision_ids())
    for i in range(2):
        mm.draw_shape(i, 40)[0].save(tmp_path / f"{i}.png")
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps({"image": [f"{i}.png", f"{1 - i}.png"], "text": "a red circle"})
                              for i in range(2)))
    b = next(mm.batches(mm.JsonlImageText(good), tok, v, batch_size=2, seq_len=20, image_size=32))
    assert (b["tokens"] == v.image_token_id).sum(1).tolist() == [2, 2]  # two 32 x 32 images: one token each
    assert b["vision"]["frame"][0].tolist() == [0] * 4 + [1] * 4  # attention stays inside each image
    cases = [('{"image": "0.png"}', "needs 'image'"), ("{not json", "not valid JSON"),
             ('{"image": "0.png", "text": "a"}\n{"image": ["0.png", "1.png"], "text": "a"}', "same number"),
             ('{"image": "gone.png", "text": "a red circle"}', "no such image file")]
    for text, match in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(UserError, match=match):
            next(mm.batches(mm.JsonlImageText(bad), tok, v, batch_size=1, seq_len=20, image_size=32))


def test_param_counts_include_the_tower():
    cfg = load_config("tiny", vision=TINY)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    visual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["visual"]))
    assert visual == cfg.param_counts()["vision"] > 0
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.param_counts()["total"]
    # the release tower into a 2048-wide text model: 27 blocks of 15.24M, merger 30.68M, patch + position 4.42M
    assert VisionConfig().num_params(2048) == pytest.approx(27 * 15.24e6 + 30.68e6 + 4.42e6, rel=1e-3)


def test_train_vl_loss_falls_below_the_text_only_floor(tmp_path):
    from qwen35_jax.train.multimodal import train_vl

    s = train_vl(None, ["steps=40", f"run_dir={tmp_path}", "eval_every=40", "log_every=10", "batch_size=8",
                        "model.num_layers=2", "model.layer_pattern=GA", "model.mtp_num_layers=0",
                        "model.vision.depth=1", "model.vision.hidden_size=32", "eval_batches=2"], quiet=True)
    first, last = s["evals"][0], s["evals"][-1]
    assert last["val_loss"] < 0.5 * first["val_loss"]
    # the colour/shape/position words: below what any model blind to the image can reach
    assert last["content_nats"] < first["text_floor_nats"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40]


def test_aot_compiles_the_train_step_with_the_tower():
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed to compile for TPU on a CPU host")
    from qwen35_jax.train.aot import compile_train_step, topology_devices, tpu_env
    from qwen35_jax.train.config import load_train_config

    tpu_env()
    tcfg = load_train_config(None, ["batch_size=4", "seq_len=64", "mesh.data=4", "model.num_layers=4",
                                    "model.mtp_num_layers=0", "model.vision.depth=2",
                                    "model.vision.hidden_size=64", "model.vision.num_heads=2",
                                    "model.vision.intermediate_size=64"])
    _, _, compiled, _, _, _ = compile_train_step(tcfg, topology_devices("v5e:2x2"))
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert re.search(r"\[\d+,100,1536\]", compiled.as_text())  # the rows' patches: the tower is in the program
