"""Early fusion: images and videos become vision tokens that replace their placeholder token embeddings.

`prepare_vision` checks the host-side inputs (pixel shapes against grids, placeholder counts against grids) and
turns them into the arrays the model consumes: a `vision` dict (patches of all images then all videos and their
per-patch metadata, `[1, N, ...]`: one attention group; training rows bring `[B, N, ...]`, one group per row) and
the [3, B, T] mRoPE positions. The model runs the tower on the patches and
`fuse_vision` scatters the merged tokens into the embedding sequence in reading order (row-major over the batch),
images into image placeholders, videos into video placeholders, as transformers' `masked_scatter` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.errors import UserError
from qwen35_jax.vision_config import VisionConfig
from qwen35_jax.vision_grid import as_grids, merged_tokens, patch_metadata, rope_index

VISION_KEYS = ("pixels", "pos_taps", "pos_weights", "rowcol", "frame")


def _concrete(x, what: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise UserError(f"{what} must be concrete (computed on the host before jit); pass precomputed `vision=` "
                        "and `positions=` arrays inside a jitted function")
    return np.asarray(x)


def prepare_vision(cfg, tokens, *, segment_ids=None, positions=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None):
    """(vision dict of arrays, positions [3, B, T]) for `forward`; raises UserError on inconsistent inputs."""
    vcfg: VisionConfig | None = cfg.vision
    if vcfg is None:
        raise UserError(f"model {cfg.name!r} has no vision tower (vision: null) but pixel inputs were given")
    m = vcfg.spatial_merge_size
    parts, grids_all = [], []
    counts = {}
    for pix, grid, name, token_id in ((pixel_values, image_grid_thw, "image", vcfg.image_token_id),
                                      (pixel_values_videos, video_grid_thw, "video", vcfg.video_token_id)):
        if (pix is None) != (grid is None):
            raise UserError(f"{name}: pass both pixel values and {name}_grid_thw, or neither")
        if pix is None:
            counts[name] = 0
            continue
        grids = as_grids(_concrete(grid, f"{name}_grid_thw"), f"{name}_grid_thw", m)
        n = int(grids.prod(-1).sum())
        shape = tuple(pix.shape)
        if len(shape) != 2 or shape != (n, vcfg.patch_dim):
            raise UserError(f"{name} pixel values have shape {shape}; the grids {grids.tolist()} need "
                            f"({n}, {vcfg.patch_dim}) = (sum t*h*w, channels * temporal_patch * patch^2)")
        parts.append(jnp.asarray(pix))
        grids_all.append(grids)
        counts[name] = merged_tokens(grids, m)
    tok = None if isinstance(tokens, jax.core.Tracer) else np.asarray(tokens)
    if tok is not None:
        valid = np.ones(tok.shape, bool) if segment_ids is None else np.asarray(segment_ids) != 0
        for name, token_id in (("image", vcfg.image_token_id), ("video", vcfg.video_token_id)):
            have = int(np.sum((tok == token_id) & valid))
            if have != counts[name]:
                raise UserError(f"the tokens hold {have} {name} placeholder tokens (id {token_id}) but the "
                                f"{name} grids give {counts[name]} vision tokens")
    if positions is None:
        if tok is None:
            raise UserError("tokens are traced: pass mRoPE positions=[3, B, T] (qwen35_jax.vision_grid.rope_index)")
        positions, _ = rope_index(vcfg, tok, image_grid_thw, video_grid_thw, segment_ids)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.ndim != 3 or positions.shape[0] != 3 or positions.shape[1:] != tuple(np.shape(tokens)):
        raise UserError(f"positions with vision inputs must be [3, B, T] = [3, {np.shape(tokens)}], got "
                        f"{tuple(positions.shape)}")
    vision = None
    if parts:
        meta = patch_metadata(vcfg, np.concatenate(grids_all))
        vision = {"pixels": jnp.concatenate(parts)[None], **{k: jnp.asarray(v)[None] for k, v in meta.items()}}
    return vision, positions


def fuse_vision(h_BTD, tokens_BT, embeds_MD, vcfg: VisionConfig):
    """Replaces placeholder embeddings: the i-th image placeholder (row-major) takes merged token i, the j-th video
    placeholder takes token (number of image placeholders + j)."""
    img = (tokens_BT == vcfg.image_token_id).reshape(-1)
    vid = (tokens_BT == vcfg.video_token_id).reshape(-1)
    img_idx = jnp.cumsum(img) - 1
    vid_idx = jnp.sum(img) + jnp.cumsum(vid) - 1
    idx = jnp.clip(jnp.where(img, img_idx, vid_idx), 0, embeds_MD.shape[0] - 1)
    take = (img | vid)[:, None]
    h = h_BTD.reshape(-1, h_BTD.shape[-1])
    h = jnp.where(take, embeds_MD[idx].astype(h.dtype), h)
    return h.reshape(h_BTD.shape)


def dummy_vision(vcfg: VisionConfig) -> dict:
    """One (1, merge, merge) image of zeros: the smallest input that initialises every tower parameter."""
    m = vcfg.spatial_merge_size
    meta = patch_metadata(vcfg, np.array([[1, m, m]]))
    return {"pixels": jnp.zeros((1, m * m, vcfg.patch_dim), jnp.float32),
            **{k: jnp.asarray(v)[None] for k, v in meta.items()}}
