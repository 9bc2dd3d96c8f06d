"""Vision-language parity with transformers 5.23.0 `Qwen3_5ForConditionalGeneration` and
`Qwen3_5MoeForConditionalGeneration` on tiny random checkpoints: logits with several images of different shapes
and a video, mRoPE positions against transformers' own `get_rope_index`, the checkpoint round trip."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwen35_jax import forward, hf
from qwen35_jax.errors import UserError
from qwen35_jax.vision_grid import rope_index
from tests.hf_fixtures import VL_FAMILIES, hf_vl_logits, hf_vl_model, max_rel_err, mm_token_type_ids, vl_prompt

FP32_TOL = 1e-4
PATCH = 3 * 2 * 16 * 16
# Grids (t, h, w) in patches: wider, tiny, taller than the 4 x 4 learned grid (up- and down-sampled); a 2-frame video.
IMAGES_0 = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]
VIDEOS_0 = [(2, 4, 4)]
IMAGES_1 = [(1, 6, 2)]



@pytest.fixture(scope="module", params=VL_FAMILIES)
def vl(request, tmp_path_factory):
    model = hf_vl_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    cfg, params = hf.load(path)
    return request.param, model, path, cfg, params


def batch(seed=0):
    """Two rows: three images and a video; one image after left padding. Returns tokens, mask and pixel inputs."""
    rng = np.random.default_rng(seed)
    rows = [vl_prompt(rng, IMAGES_0, VIDEOS_0), vl_prompt(rng, IMAGES_1, text=(4, 6))]
    T = max(map(len, rows))
    tokens, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):], mask[b, T - len(r):] = r, 1
    images, videos = np.array(IMAGES_0 + IMAGES_1), np.array(VIDEOS_0)
    pv = rng.standard_normal((int(images.prod(-1).sum()), PATCH)).astype(np.float32)
    pvv = rng.standard_normal((int(videos.prod(-1).sum()), PATCH)).astype(np.float32)
    return tokens, mask, dict(pixel_values=pv, image_grid_thw=images, pixel_values_videos=pvv, video_grid_thw=videos)


def test_logits_match_fp32_with_images_and_video(vl):
    family, model, path, cfg, params = vl
    tokens, mask, pix = batch()
    with torch.no_grad():
        kw = {k: torch.tensor(v) for k, v in pix.items()}
        ref = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    mm_token_type_ids=torch.tensor(mm_token_type_ids(tokens)), **kw).logits.numpy()
    ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask, **pix))
    valid = mask.astype(bool)
    assert max_rel_err(ours[valid], ref[valid]) <= FP32_TOL
    # The images matter: other pixels (same shapes, same compiled program) move the logits after them.
    blank = np.asarray(forward(cfg, params, tokens, segment_ids=mask,
                               **{**pix, "pixel_values": np.zeros_like(pix["pixel_values"])}))
    assert max_rel_err(blank[valid], ref[valid]) > 100 * FP32_TOL


def test_rope_index_matches_transformers(vl):
    family, model, path, cfg, params = vl
    tokens, mask, pix = batch(1)
    cases = [(tokens, mask, pix["image_grid_thw"], pix["video_grid_thw"]),
             (tokens[:1, mask[0] == 1], None, pix["image_grid_thw"][:3], pix["video_grid_thw"]),
             (vl_prompt(np.random.default_rng(2), [], [(3, 2, 6)])[None], None, None, np.array([(3, 2, 6)]))]
    for tok, m, images, videos in cases:
        ref_pos, ref_delta = model.model.get_rope_index(
            torch.tensor(tok), torch.tensor(mm_token_type_ids(tok)),
            image_grid_thw=None if images is None else torch.tensor(images),
            video_grid_thw=None if videos is None else torch.tensor(videos),
            attention_mask=None if m is None else torch.tensor(m))
        pos, delta = rope_index(cfg.vision, tok, images, videos, m)
        np.testing.assert_array_equal(pos, ref_pos.numpy())
        np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
        assert (pos[1] != pos[2]).any()  # real 2-D positions (the comparison is not text-only)


def test_round_trip_and_transformers_reloads(vl, tmp_path):
    from transformers import AutoModelForImageTextToText

    family, model, path, cfg, params = vl
    hf.save(cfg, params, tmp_path)
    with safe_open(path / "model.safetensors", "numpy") as src, safe_open(tmp_path / "model.safetensors",
                                                                          "numpy") as dst:
        assert set(src.keys()) == set(dst.keys())
        assert any(k.startswith("model.visual.") for k in dst.keys())
        for name in src.keys():
            np.testing.assert_array_equal(src.get_tensor(name), dst.get_tensor(name), err_msg=name)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type and "vision_config" in saved
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    rng = np.random.default_rng(3)
    grids = np.array([(1, 4, 2)])
    tokens = vl_prompt(rng, grids.tolist())[None]
    pv = rng.standard_normal((8, PATCH)).astype(np.float32)
    np.testing.assert_allclose(hf_vl_logits(reloaded, tokens, pv, grids), hf_vl_logits(model, tokens, pv, grids),
                               rtol=0, atol=1e-5)
    assert hf.load(tmp_path)[0] == cfg


def test_bad_vision_inputs_are_one_line_errors(vl):
    family, model, path, cfg, params = vl
    rng = np.random.default_rng(4)
    grids = np.array([(1, 4, 4)])
    tokens = vl_prompt(rng, grids.tolist())[None]
    pv = np.zeros((16, PATCH), np.float32)
    cases = [
        (dict(pixel_values=np.zeros((32, PATCH), np.float32), image_grid_thw=[(1, 8, 4)]),
         r"4 image placeholder tokens .* give 8 vision tokens"),
        (dict(pixel_values=np.zeros((16, 100), np.float32), image_grid_thw=grids), r"shape \(16, 100\)"),
        (dict(pixel_values=np.zeros((15, PATCH), np.float32), image_grid_thw=[(1, 5, 3)]),
         "multiples of the spatial merge size"),
        (dict(pixel_values=pv), "pass both"),
    ]
    for kw, match in cases:
        with pytest.raises(UserError, match=match) as e:
            forward(cfg, params, tokens, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no vision tower"):
        forward(cfg.replace(vision=None), params, tokens, pixel_values=pv, image_grid_thw=grids)
