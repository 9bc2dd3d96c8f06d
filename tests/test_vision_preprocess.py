"""The Pillow image preprocessor against transformers' Qwen2VLImageProcessorPil configured as the release's
processor (patch 16, merge 2, 2 frames, mean/std 0.5), and its one-line errors for bad images."""

import numpy as np
import pytest
from PIL import Image

from qwen35_jax.errors import UserError
from qwen35_jax.image_processing import image_tokens, preprocess_images
from qwen35_jax.vision_config import VisionConfig


def images(rng):
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(50, 70), (300, 90), (64, 64), (500, 400)]]
    rgba = Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA")
    return rgb + [rgb[0].convert("L"), rgba]


@pytest.mark.parametrize("min_pixels,max_pixels", [(64 * 64, 256 * 256), (256 * 256, 4096 * 4096)],
                         ids=["downscale", "release-bounds"])
def test_patches_equal_transformers(min_pixels, max_pixels, tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ims = images(np.random.default_rng(0))
    ims[1].save(tmp_path / "b.png")
    ref = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
                                   )(images=ims, return_tensors="np")
    pv, grids = preprocess_images([ims[0], tmp_path / "b.png"] + ims[2:], min_pixels=min_pixels,
                                  max_pixels=max_pixels)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)
    assert (grids[:, 1:] % 2 == 0).all() and len({tuple(g) for g in grids.tolist()}) > 2


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((8, 300, 3), np.uint8)).save(tmp_path / "tiny.png")
    cases = [("corrupt.png", "not a readable image"), ("truncated.png", "not a readable image"),
             ("missing.png", "no such image file"), ("tiny.png", r"300x8 pixels is below the minimum size")]
    for name, match in cases:
        with pytest.raises(UserError, match=match) as e:
            preprocess_images([tmp_path / name])
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(UserError, match="aspect ratio"):
        preprocess_images([Image.new("RGB", (20 * 210, 20))])


def test_image_tokens_match_grid():
    v = VisionConfig()
    toks = image_tokens(v, (1, 14, 20))
    assert toks[0] == v.vision_start_token_id and toks[-1] == v.vision_end_token_id
    assert toks.count(v.image_token_id) == 14 * 20 // 4


def test_image_prompt_needs_a_vision_tower(tmp_path):
    from qwen35_jax.config import load_config
    from qwen35_jax.image_processing import image_prompt

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(UserError, match="no vision tower"):
        image_prompt(load_config("tiny"), [tmp_path / "ok.png"], [1, 2])
    cfg = load_config("tiny", vision={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2})
    ids, pv, grids = image_prompt(cfg, [tmp_path / "ok.png"], [1, 2], min_pixels=64 * 64, max_pixels=64 * 64)
    assert grids.tolist() == [[1, 4, 4]] and pv.shape == (16, 1536)
    assert ids == image_tokens(cfg.vision, (1, 4, 4)) + [1, 2]
