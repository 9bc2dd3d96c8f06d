"""Block-scaled FP8 weights as the `*-FP8` releases store them (DeepSeek-V3 style, transformers' "fp8" method):
`W` F8_E4M3 [..., M, N] and `W_scale_inv` float [..., ceil(M/bm), ceil(N/bn)] with
`dequantized[..., i, j] = W[..., i, j] * scale_inv[..., i // bm, j // bn]` (edge blocks are ragged)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qwen35_jax.hf.common import CheckpointError

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`, fused `experts.gate_up_proj` -> `..._scale_inv`


def block_size(cfg_dict: dict) -> tuple[int, int]:
    """The quantization block [rows, cols] from config.json (`quantization_config.weight_block_size`)."""
    q = cfg_dict.get("quantization_config") or (cfg_dict.get("text_config") or {}).get("quantization_config") or {}
    if q and q.get("quant_method", "fp8") != "fp8":
        raise CheckpointError(f"config.json: quantization_config.quant_method={q.get('quant_method')!r} is not "
                              "supported (only block-scaled fp8)")
    if q.get("activation_scheme", "dynamic") not in ("dynamic",):
        raise CheckpointError(f"config.json: quantization_config.activation_scheme={q['activation_scheme']!r} is "
                              "not supported (only dynamic)")
    bs = q.get("weight_block_size") or (128, 128)
    return int(bs[0]), int(bs[1])


def dequantize(w, scale_inv, block: tuple[int, int], name: str = "tensor") -> np.ndarray:
    """float32 W * scale_inv broadcast over its [bm, bn] blocks; the scale grid must cover W exactly."""
    w = np.asarray(w)
    s = np.asarray(scale_inv, np.float32)
    bm, bn = block
    M, N = w.shape[-2:]
    want = w.shape[:-2] + (-(-M // bm), -(-N // bn))
    if tuple(s.shape) != want:
        raise CheckpointError(f"tensor {name!r}: scale_inv has shape {tuple(s.shape)}, {tuple(w.shape)} in "
                              f"{bm}x{bn} blocks needs {want}")
    full = np.repeat(np.repeat(s, bm, axis=-2), bn, axis=-1)[..., :M, :N]
    return w.astype(np.float32) * full


def quantize(w, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(F8_E4M3 W, float32 scale_inv): each block scaled so its largest magnitude maps to 448 (the inverse of
    `dequantize`, up to FP8 rounding)."""
    w = np.asarray(w, np.float32)
    bm, bn = block
    M, N = w.shape[-2:]
    gm, gn = -(-M // bm), -(-N // bn)
    pad = [(0, 0)] * (w.ndim - 2) + [(0, gm * bm - M), (0, gn * bn - N)]
    blocks = np.pad(w, pad).reshape(w.shape[:-2] + (gm, bm, gn, bn))
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    full = np.repeat(np.repeat(scale_inv, bm, axis=-2), bn, axis=-1)[..., :M, :N]
    return (w / full).astype(FP8), scale_inv
