"""Images -> the flattened patches the vision tower takes, as the release's processor makes them (Pillow only).

Each image is converted to RGB, resized (bicubic) so both sides are multiples of patch * merge (32) with the
pixel count inside [min_pixels, max_pixels] and the aspect ratio kept as closely as possible (transformers'
`smart_resize`), scaled to [0, 1], normalised with mean 0.5 / std 0.5, duplicated to the 2 frames of a temporal
patch and cut into patches ordered per 2 x 2 merge block. Defaults are the release's preprocessor config
(shortest_edge 65536 = 256^2 pixels, longest_edge 16777216 = 4096^2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qwen35_jax.errors import UserError
from qwen35_jax.vision_config import VisionConfig

MIN_PIXELS = 256 * 256
MAX_PIXELS = 4096 * 4096
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MAX_ASPECT = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, what: str = "image"):
    """(height, width) multiples of `factor` with height * width in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UserError(f"{what}: aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT} "
                        f"({width}x{height} pixels)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(im):
    """RGB, with any transparency composited onto white (as transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def load_image(path):
    """A Pillow RGB image from a path; a missing, corrupt or truncated file is a one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def patchify(image_CHW: np.ndarray, vcfg: VisionConfig) -> np.ndarray:
    """[C, H, W] float32 -> [H/p * W/p, C * tp * p * p]: merge blocks row-major, patches of a block row-major,
    the frame repeated tp times (a still image fills a whole temporal patch)."""
    C, H, W = image_CHW.shape
    p, m, tp = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
    gh, gw = H // p, W // p
    x = image_CHW.reshape(C, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (tp,) + x.shape[5:])
    return np.ascontiguousarray(x).reshape(gh * gw, C * tp * p * p)


def preprocess_images(images, vcfg: VisionConfig | None = None, *, min_pixels: int = MIN_PIXELS,
                      max_pixels: int = MAX_PIXELS, mean=MEAN, std=STD, min_side: int | None = None):
    """Images (paths or Pillow images) -> (pixel_values [N, C*tp*p*p] float32, image_grid_thw [n, 3] int64).

    An image whose shorter side is below `min_side` pixels (default: one patch) is rejected rather than blown up.
    """
    from PIL import Image

    vcfg = vcfg or VisionConfig()
    factor = vcfg.patch_size * vcfg.spatial_merge_size
    min_side = vcfg.patch_size if min_side is None else min_side
    if min_pixels > max_pixels:
        raise UserError(f"min_pixels={min_pixels} exceeds max_pixels={max_pixels}")
    patches, grids = [], []
    for i, img in enumerate(images):
        what = str(img) if isinstance(img, (str, Path)) else f"image {i}"
        im = load_image(img) if isinstance(img, (str, Path)) else to_rgb(img)
        w, h = im.size
        if min(w, h) < min_side:
            raise UserError(f"{what}: {w}x{h} pixels is below the minimum size ({min_side} pixels on each side)")
        rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels, what)
        if (rw, rh) != (w, h):
            im = im.resize((rw, rh), Image.BICUBIC)
        x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
        x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
        patches.append(patchify(x.astype(np.float32), vcfg))
        grids.append((1, rh // vcfg.patch_size, rw // vcfg.patch_size))
    if not patches:
        raise UserError("no images given")
    return np.concatenate(patches), np.asarray(grids, np.int64)


def image_tokens(vcfg: VisionConfig, grid) -> list[int]:
    """The placeholder run of one image: vision start, one image token per merged patch, vision end."""
    t, h, w = (int(x) for x in grid)
    n = t * h * w // vcfg.spatial_merge_size ** 2
    return [vcfg.vision_start_token_id] + [vcfg.image_token_id] * n + [vcfg.vision_end_token_id]


def image_prompt(cfg, paths, ids: list[int], *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """(prompt ids with each image's placeholder run in front, in order, pixel_values, image_grid_thw) for
    `generate`; a model without a vision tower is a one-line error."""
    if cfg.vision is None:
        raise UserError(f"model {cfg.name!r} has no vision tower (vision: null): --image needs a vision-language "
                        "checkpoint")
    pixel_values, grids = preprocess_images(paths, cfg.vision, min_pixels=min_pixels, max_pixels=max_pixels)
    prefix = [t for g in grids for t in image_tokens(cfg.vision, g)]
    return prefix + list(ids), pixel_values, grids
