"""Image-text training data: JSONL records with image paths, and an embedded set of shapes drawn on the fly.

A record is `{"image": PATH or [PATH, ...], "text": "..."}` (paths relative to the JSONL file). Each example
becomes one row: every image's placeholder run (`<vision_start> <image>*n <vision_end>`) in order, then the text,
then end of text; the loss covers the text and the end token only. Images are resized to a fixed `image_size`
square so every row has the same patch count (one compiled train step); the per-row vision arrays carry a leading
batch axis so that they shard and split into micro-batches like the tokens.

The embedded default (`kind: shapes`) needs no download: a coloured shape (8 colours x 4 shapes) in one of four
quadrants of a grey canvas, captioned "a red circle at the top left". Its word-level tokenizer keeps the model tiny;
a text-only model cannot beat log(8 * 4 * 4) nats on the three content words, so a loss below that floor is
learned from the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen35_jax.errors import UserError
from qwen35_jax.image_processing import MEAN, STD, image_tokens, load_image, patchify
from qwen35_jax.vision_config import VisionConfig
from qwen35_jax.vision_grid import patch_metadata, rope_index

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = ("top left", "top right", "bottom left", "bottom right")
# A text-only model's best loss on the three content words (colour, shape, quadrant) of a shapes caption.
SHAPES_TEXT_FLOOR_NATS = float(np.log(len(COLOURS)) + np.log(len(SHAPES)) + np.log(len(PLACES)))


class WordTokenizer:
    """Whitespace words over a fixed vocabulary: 0 pad, 1 end of text, then the words; vision ids after them."""

    def __init__(self, words):
        self.words = ["<pad>", "<eos>"] + list(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.eos_id, self.pad_id = 1, 0
        self.vocab_size = len(self.words) + 4  # + vision start, end, image, video

    def encode(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.ids:
                raise UserError(f"word {w!r} is not in the tokenizer's vocabulary of {len(self.words)} words")
            out.append(self.ids[w])
        return out

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids if 1 < i < len(self.words))

    def vision_ids(self) -> dict:
        n = len(self.words)
        return {"vision_start_token_id": n, "vision_end_token_id": n + 1, "image_token_id": n + 2,
                "video_token_id": n + 3}


def shapes_tokenizer() -> WordTokenizer:
    words = ["a", "at", "the"] + list(COLOURS) + list(SHAPES) + sorted({w for p in PLACES for w in p.split()})
    return WordTokenizer(words)


def draw_shape(index: int, size: int, seed: int = 0):
    """(Pillow image, caption) of example `index`: deterministic in (index, seed)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    place = int(rng.integers(len(PLACES)))
    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    half = size // 2
    r = half * rng.uniform(0.28, 0.42)
    cx = (place % 2) * half + half / 2 + rng.uniform(-0.08, 0.08) * half
    cy = (place // 2) * half + half / 2 + rng.uniform(-0.08, 0.08) * half
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return im, f"a {colour} {shape} at the {PLACES[place]}"


class ShapesSource:
    """The embedded image-caption set: `num_examples` drawn on demand (split "validation" uses other seeds)."""

    def __init__(self, num_examples: int = 100_000, seed: int = 0, split: str = "train"):
        self.n, self.seed = num_examples, seed + (7919 if split == "validation" else 0)

    def __len__(self):
        return self.n

    def example(self, i: int, image_size: int):
        im, text = draw_shape(i, image_size, self.seed)
        return [im], text


class JsonlImageText:
    """Records `{"image": path or [paths], "text": ...}` from one JSONL file."""

    def __init__(self, path, image_key: str = "image", text_key: str = "text"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such JSONL file")
        self.records = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
            images = rec.get(image_key) if isinstance(rec, dict) else None
            images = [images] if isinstance(images, str) else images
            if not images or not all(isinstance(p, str) for p in images) or not isinstance(rec.get(text_key), str):
                raise UserError(f"{self.path}:{n}: a record needs {image_key!r} (a path or a list of paths) and "
                                f"{text_key!r} (a string)")
            self.records.append(([self.path.parent / p for p in images], rec[text_key], n))
        if not self.records:
            raise UserError(f"{self.path}: no records")
        counts = {len(r[0]) for r in self.records}
        if len(counts) > 1:
            raise UserError(f"{self.path}: records hold {sorted(counts)} images; every record must hold the same "
                            "number (one compiled step per row shape)")

    def __len__(self):
        return len(self.records)

    def example(self, i: int, image_size: int):
        paths, text, _ = self.records[i]
        return [load_image(p) for p in paths], text


def image_patches(im, size: int, vcfg: VisionConfig) -> np.ndarray:
    """A Pillow image resized (bicubic) to size x size, normalised as the release, -> [(size/p)^2, patch_dim]."""
    from PIL import Image

    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    x = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    x = (x - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]
    return patchify(x.astype(np.float32), vcfg)


def make_row(source, i: int, tokenizer, vcfg: VisionConfig, seq_len: int, image_size: int):
    """One training row: tokens/targets/loss_mask [T], mRoPE positions [3, T], patches and metadata."""
    images, text = source.example(i, image_size)
    g = image_size // vcfg.patch_size
    grid = (1, g, g)
    ids = [t for _ in images for t in image_tokens(vcfg, grid)]
    n_vision = len(ids)
    ids += list(tokenizer.encode(text)) + [tokenizer.eos_id]
    if len(ids) - 1 > seq_len:
        raise UserError(f"example {i}: {len(ids)} tokens (images and text) exceed seq_len={seq_len}")
    tokens = np.zeros(seq_len, np.int32)
    targets = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len, np.float32)
    seg = np.zeros(seq_len, np.int32)
    tokens[:len(ids) - 1] = ids[:-1]
    targets[:len(ids) - 1] = ids[1:]
    mask[n_vision - 1:len(ids) - 1] = 1.0  # predict the text and the end token (from the last vision token on)
    seg[:len(ids) - 1] = 1
    grids = np.array([grid] * len(images))
    pos, _ = rope_index(vcfg, tokens[None], grids, None, seg[None])
    pixels = np.concatenate([image_patches(im, image_size, vcfg) for im in images])
    meta = patch_metadata(vcfg, grids)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos[:, 0],
            "vision": {"pixels": pixels, **meta}}


def batches(source, tokenizer, vcfg: VisionConfig, *, batch_size: int, seq_len: int, image_size: int,
            seed: int = 0, shuffle: bool = True, start: int = 0):
    """Endless batches (rows stacked; positions [B, 3, T]; vision arrays [B, N, ...]). `start` skips batches
    (resumption is a batch count: the order is a function of the seed alone)."""
    if image_size % (vcfg.patch_size * vcfg.spatial_merge_size):
        raise UserError(f"image_size={image_size} must be a multiple of patch * merge = "
                        f"{vcfg.patch_size * vcfg.spatial_merge_size}")
    n = len(source)
    step = start
    while True:
        epoch, offset = divmod(step * batch_size, n)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        idx = [order[(offset + j) % n] for j in range(batch_size)]
        rows = [make_row(source, int(i), tokenizer, vcfg, seq_len, image_size) for i in idx]
        out = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                         "positions")}
        out["vision"] = {k: np.stack([r["vision"][k] for r in rows]) for k in rows[0]["vision"]}
        yield out
        step += 1



def vision_batch_shapes(vcfg: VisionConfig, batch_size: int, seq_len: int, image_size: int | None = None):
    """Shapes of a batch's image-text extras (for ahead-of-time compiles): positions [B, 3, T] and the per-row
    vision arrays of one image_size^2 image per row (default 448, or the largest multiple of patch * merge
    whose tokens fill at most half of seq_len)."""
    import jax

    factor = vcfg.patch_size * vcfg.spatial_merge_size
    if image_size is None:
        side = min(448 // factor, max(1, int((seq_len // 2 - 2) ** 0.5)))
        image_size = side * factor
    n = (image_size // vcfg.patch_size) ** 2
    sds = jax.ShapeDtypeStruct
    return {"positions": sds((batch_size, 3, seq_len), np.int32),
            "vision": {"pixels": sds((batch_size, n, vcfg.patch_dim), np.float32),
                       "pos_taps": sds((batch_size, n, 4), np.int32),
                       "pos_weights": sds((batch_size, n, 4), np.float32),
                       "rowcol": sds((batch_size, n, 2), np.int32), "frame": sds((batch_size, n), np.int32)}}
