"""Greedy generation after a prompt with an image equals transformers' greedy `generate` on the tiny VL checkpoint
(decoding continues the mRoPE positions after the offset the image introduces)."""

import numpy as np
import pytest
import torch

from qwen35_jax import generate, hf
from tests.hf_fixtures import hf_vl_model, mm_token_type_ids, vl_prompt

PATCH = 3 * 2 * 16 * 16


@pytest.mark.parametrize("family", ["qwen3_5_vl"])
def test_greedy_generation_with_an_image_matches_transformers(family, tmp_path):
    model = hf_vl_model(family)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    rng = np.random.default_rng(0)
    # 36 vision tokens that advance the positions by 6: decoding resumes 30 below the token count. (Resuming at
    # the token count instead changes this continuation from its second token: checked when the test was written.)
    grids = np.array([(1, 12, 12)])
    prompt = vl_prompt(rng, grids.tolist(), text=(3, 4))
    pv = rng.standard_normal((144, PATCH)).astype(np.float32)
    new = 16
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(prompt[None]), pixel_values=torch.tensor(pv),
                             image_grid_thw=torch.tensor(grids),
                             mm_token_type_ids=torch.tensor(mm_token_type_ids(prompt[None])),
                             max_new_tokens=new, do_sample=False, min_new_tokens=new)
    ref_new = ref[0, len(prompt):].tolist()
    ours = generate(cfg, params, [prompt.tolist()], max_new_tokens=new, pixel_values=pv, image_grid_thw=grids,
                    chunk=4)
    assert ours.tokens[0] == ref_new


def test_cli_image_flag_matches_transformers_processor_and_generate(tmp_path, capsys):
    """`qwen35 generate CKPT --image a.png --image b.png`: our preprocessing, placeholder layout and decoding against
    transformers' image processor and greedy generate; bad images and text-only checkpoints are one-line errors."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qwen35_jax.errors import run_cli
    from qwen35_jax.generate_cli import generate_main

    model = hf_vl_model("qwen3_5_vl", seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    paths = []
    for name, (h, w) in (("a.png", (70, 40)), ("b.png", (64, 128))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    bounds = {"shortest_edge": 64 * 64, "longest_edge": 96 * 96}
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size=bounds)
    ref_in = proc(images=[Image.open(p) for p in paths], return_tensors="pt")
    prompt = []
    for t, h, w in ref_in["image_grid_thw"].tolist():
        prompt += [93] + [95] * (t * h * w // 4) + [94]
    prompt = np.asarray(prompt + [4, 8, 15], np.int64)[None]
    new = 6
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(prompt), pixel_values=ref_in["pixel_values"],
                             image_grid_thw=ref_in["image_grid_thw"],
                             mm_token_type_ids=torch.tensor(mm_token_type_ids(prompt)), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    argv = [str(tmp_path / "ckpt"), "--prompt-ids", "4,8,15", "--max-new-tokens", str(new), "--print-ids",
            "--image", str(paths[0]), "--image", str(paths[1]), "--min-pixels", str(bounds["shortest_edge"]),
            "--max-pixels", str(bounds["longest_edge"])]
    assert run_cli(lambda: generate_main(argv)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == " ".join(map(str, ref[0, prompt.shape[1]:].tolist()))

    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert run_cli(lambda: generate_main(argv[:-6] + ["--image", str(tmp_path / "bad.png")])) == 2
    err = capsys.readouterr().err
    assert "bad.png: not a readable image" in err and len(err.strip().splitlines()) == 1
