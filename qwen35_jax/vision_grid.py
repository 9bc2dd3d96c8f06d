"""Host-side (numpy) bookkeeping of images and videos: grids, per-patch metadata, mRoPE positions.

A grid `(t, h, w)` counts temporal patches and patch rows/columns of one image or video (the Hugging Face
processor's `image_grid_thw` / `video_grid_thw`). Everything here depends only on grids and token ids, so it runs
once on the host and the model sees plain arrays.
"""

from __future__ import annotations

import numpy as np

from qwen35_jax.errors import UserError
from qwen35_jax.vision_config import VisionConfig


def as_grids(grid_thw, what: str, merge: int) -> np.ndarray:
    """[n, 3] int64 grids, checked: positive, h and w multiples of the merge size."""
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    try:
        g = np.asarray(grid_thw)
    except Exception:
        raise UserError(f"{what} must be concrete [n, 3] integers (t, h, w), not a traced value") from None
    if g.dtype == object or g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer):
        raise UserError(f"{what} must be an [n, 3] integer array of (t, h, w) grids, got shape {g.shape} "
                        f"dtype {g.dtype}")
    for i, (t, h, w) in enumerate(g.tolist()):
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise UserError(f"{what}[{i}] = ({t}, {h}, {w}): t must be >= 1 and h, w positive multiples of the "
                            f"spatial merge size {merge}")
    return g.astype(np.int64)


def patch_rowcol(grids: np.ndarray, merge: int) -> np.ndarray:
    """(row, col) [N, 2] of every patch in the processor's order: per frame, merge blocks row-major, then the
    merge x merge patches of a block row-major."""
    out = []
    for t, h, w in grids.tolist():
        r = np.arange(h).reshape(h // merge, merge, 1, 1)
        c = np.arange(w).reshape(1, 1, w // merge, merge)
        rows = np.broadcast_to(r, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        cols = np.broadcast_to(c, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Bilinear align_corners=True taps (floor, floor + 1, clamped to the border) and weights along one axis."""
    src = index.astype(np.float64) * (side - 1) / np.maximum(size - 1, 1)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor[:, None].astype(np.int64) + offsets, 0, side - 1)
    weights = np.clip(1.0 - np.abs(src[:, None] - floor[:, None] - offsets), 0.0, None)
    return taps, weights


def patch_metadata(vcfg: VisionConfig, grids: np.ndarray) -> dict:
    """Per-patch arrays for `VisionTower`: pos_taps [N, 4] int32 into the flattened learned grid, pos_weights [N, 4]
    fp32 (bilinear, align_corners=True, as transformers resamples it), rowcol [N, 2] int32 (2-D rotary), frame [N]
    int32 (attention segments: one per temporal patch of each image or video)."""
    m, side = vcfg.spatial_merge_size, vcfg.grid_side
    rc = patch_rowcol(grids, m)
    per = [(t, h, w) for t, h, w in grids.tolist()]
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in per]) if per else np.zeros(0)
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in per]) if per else np.zeros(0)
    h_taps, h_w = _axis_taps(rc[:, 0], heights, side)
    w_taps, w_w = _axis_taps(rc[:, 1], widths, side)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    frame = np.repeat(np.arange(int(grids[:, 0].sum())), np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])) \
        if len(grids) else np.zeros(0, np.int64)
    return {"pos_taps": taps.astype(np.int32), "pos_weights": weights.astype(np.float32),
            "rowcol": rc.astype(np.int32), "frame": frame.astype(np.int32)}


def merged_tokens(grids: np.ndarray, merge: int) -> int:
    return int(np.sum(grids.prod(-1)) // merge ** 2) if len(grids) else 0


def rope_index(vcfg: VisionConfig, tokens_BT, image_grid_thw=None, video_grid_thw=None, segment_ids_BT=None):
    """mRoPE positions [3, B, T] int32 and the per-row offset [B] (max position + 1 - valid length) that decoding
    adds to the text position, as transformers' `get_rope_index`.

    The modality of each token comes from the ids: a run of image (video) placeholder tokens is one image (one
    temporal patch of a video, each between its own vision start/end tokens) and takes the next grid. Text
    advances all three rows by one per token; an image block takes (t, h / merge, w / merge) grid indices offset
    by the current position, after which the position advances by max(h, w) / merge. Padding (segment id 0) is
    skipped and left at 0.
    """
    m = vcfg.spatial_merge_size
    tokens = np.asarray(tokens_BT)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be [batch, time], got shape {tokens.shape}")
    images = as_grids(image_grid_thw, "image_grid_thw", m)
    videos = as_grids(video_grid_thw, "video_grid_thw", m)
    # transformers gives every temporal patch of a video its own (1, h, w) grid: frames are separated by timestamps
    frames = np.repeat(videos, videos[:, 0], axis=0) if len(videos) else videos
    frames[:, 0] = 1
    queues = {1: (list(images), "image"), 2: (list(frames), "video frame")}
    used = {1: 0, 2: 0}
    B, T = tokens.shape
    positions = np.zeros((3, B, T), np.int64)
    deltas = np.zeros(B, np.int64)
    for b in range(B):
        valid = np.ones(T, bool) if segment_ids_BT is None else np.asarray(segment_ids_BT)[b] != 0
        ids = tokens[b][valid]
        kind = np.where(ids == vcfg.image_token_id, 1, np.where(ids == vcfg.video_token_id, 2, 0))
        starts = np.flatnonzero(np.concatenate([[True], kind[1:] != kind[:-1]])) if len(ids) else np.zeros(0, int)
        ends = np.concatenate([starts[1:], [len(ids)]]).astype(int)
        cur, cols = 0, []
        for s, e in zip(starts, ends):
            k = int(kind[s])
            if k == 0:
                cols.append(np.broadcast_to(np.arange(e - s) + cur, (3, e - s)))
                cur += e - s
                continue
            queue, name = queues[k]
            if used[k] >= len(queue):
                raise UserError(f"row {b}: a run of {name} placeholder tokens at position {s} has no grid left "
                                f"({len(queue)} {name}s given)")
            t, h, w = (int(x) for x in queue[used[k]])
            n = t * (h // m) * (w // m)
            if e - s != n:
                raise UserError(f"row {b}: {name} {used[k]} has {e - s} placeholder tokens but its grid "
                                f"({t}, {h}, {w}) needs {n}")
            used[k] += 1
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            cols.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
            cur += max(h, w) // m
        if cols:
            row = np.concatenate(cols, axis=1)
            positions[:, b, valid] = row
            deltas[b] = row.max() + 1 - len(ids)
    for k, (queue, name) in queues.items():
        if used[k] != len(queue):
            raise UserError(f"{len(queue)} {name}s given but the tokens hold {used[k]} runs of {name} "
                            "placeholder tokens")
    return positions.astype(np.int32), deltas.astype(np.int32)
