"""The Qwen3.5 vision encoder and patch merger (architecture.md section 8), as functional Linen modules.

Input: flattened patches `[N, C * temporal_patch * patch * patch]` in the Hugging Face processor's order (per frame,
2 x 2 merge blocks row-major, the 4 patches of a block consecutive), plus per-patch metadata computed on the host
from each image's `(t, h, w)` grid (`qwen35_jax.vision_grid.patch_metadata`): bilinear taps into the learned
position grid, (row, col) for the 2-D rotary, and a frame id (attention stays inside one temporal patch of one
image). Because the metadata are arrays, one compiled tower serves every grid with the same patch count.

Blocks: pre-LayerNorm (with bias, eps 1e-6) non-causal attention with 2-D axial RoPE (theta 1e4; the first half of
each head rotates by the row, the second by the column, frequencies from head_dim / 4), then a tanh-GELU MLP.
Merger: LayerNorm per patch, concatenate each 2 x 2 block (4 D), Linear, exact GELU, Linear to the text width.
Qwen3.5 has no deepstack outputs (Qwen3-VL's per-layer side mergers were dropped): the merger output is all there is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.layers.common import accum_dtype, dense_init, param, with_axes
from qwen35_jax.layers.rope import rotate_half
from qwen35_jax.vision_config import VisionConfig

NEG_INF = -1e30


def vision_rope_cos_sin(rowcol_IN2, head_dim: int, theta: float):
    """cos, sin [I, N, head_dim] fp32: angles (row * f, col * f) for f over head_dim / 4 frequencies, twice."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    rc = rowcol_IN2.astype(jnp.float32)
    angles = jnp.concatenate([rc[..., :1] * inv_freq, rc[..., 1:2] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class LayerNorm(nn.Module):
    """LayerNorm with bias, computed in fp32 and cast back."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        D = x.shape[-1]
        w = param(self, "scale", nn.initializers.ones, (D,), self.param_dtype, ("norm",))
        b = param(self, "bias", nn.initializers.zeros, (D,), self.param_dtype, ("norm",))
        f = x.astype(accum_dtype(x.dtype))
        mean = jnp.mean(f, -1, keepdims=True)
        var = jnp.mean(jnp.square(f - mean), -1, keepdims=True)
        y = (f - mean) * jax.lax.rsqrt(var + self.eps) * w.astype(f.dtype) + b.astype(f.dtype)
        return y.astype(x.dtype)


def _dense(n, axes, dtype, param_dtype, name, std=0.02):
    """nn.Dense with bias; the [in, out] kernel declares `axes`, the bias the output axis."""
    return nn.Dense(n, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=with_axes(dense_init(std), axes), bias_init=with_axes(nn.initializers.zeros, axes[1:]),
                    name=name)


class VisionBlock(nn.Module):
    vcfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_IND, cos_INK, sin_INK, mask_INN):
        c = self.vcfg
        I, N, D = x_IND.shape
        H, K = c.num_heads, c.head_dim
        dense = lambda n, axes, name: _dense(n, axes, self.dtype, self.param_dtype, name)  # noqa: E731
        h = LayerNorm(c.layer_norm_eps, self.param_dtype, name="norm1")(x_IND)
        qkv = dense(3 * D, ("embed", "heads"), "qkv")(h.astype(self.dtype)).reshape(I, N, 3, H, K)
        acc = accum_dtype(self.dtype)
        cos, sin = cos_INK[:, :, None], sin_INK[:, :, None]
        rot = lambda t: (t.astype(acc) * cos + rotate_half(t.astype(acc)) * sin).astype(self.dtype)  # noqa: E731
        q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
        logits = jnp.einsum("INHK,IMHK->IHNM", q, k, preferred_element_type=acc) * (K ** -0.5)
        probs = jax.nn.softmax(jnp.where(mask_INN[:, None], logits, NEG_INF), axis=-1)
        out = jnp.einsum("IHNM,IMHK->INHK", probs.astype(self.dtype), v, preferred_element_type=acc)
        y = dense(D, ("heads", "embed"), "proj")(out.reshape(I, N, D).astype(self.dtype))
        x_IND = x_IND + y.astype(x_IND.dtype)
        h = LayerNorm(c.layer_norm_eps, self.param_dtype, name="norm2")(x_IND)
        h = jax.nn.gelu(dense(c.intermediate_size, ("embed", "mlp"), "fc1")(h.astype(self.dtype)), approximate=True)
        x_IND = x_IND + dense(D, ("mlp", "embed"), "fc2")(h).astype(x_IND.dtype)
        return x_IND, None


class PatchMerger(nn.Module):
    """[..., N, D] patches (2 x 2 blocks consecutive) -> [..., N / 4, out] tokens."""

    vcfg: VisionConfig
    out_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_ND):
        c = self.vcfg
        M = c.spatial_merge_size ** 2 * c.hidden_size
        x = LayerNorm(c.layer_norm_eps, self.param_dtype, name="norm")(x_ND)
        x = x.reshape(x.shape[:-2] + (-1, M)).astype(self.dtype)
        x = jax.nn.gelu(_dense(M, (None, "mlp"), self.dtype, self.param_dtype, "fc1")(x), approximate=False)
        return _dense(self.out_size, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(x)


class VisionTower(nn.Module):
    """Patches [I, N, patch_dim] + metadata [I, N, ...] -> merged vision tokens [I * N / merge^2, out_size] (fp32
    accumulate), in order. Attention stays inside one of the I groups (a training row; all of a prompt's images)
    and, within it, inside one frame id."""

    vcfg: VisionConfig
    out_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, pixels_INP, pos_taps_IN4, pos_weights_IN4, rowcol_IN2, frame_IN):
        c = self.vcfg
        acc = accum_dtype(self.dtype)
        x = _dense(c.hidden_size, (None, "embed"), self.dtype, self.param_dtype, "patch_embed", self.init_std)(
            pixels_INP.astype(self.dtype)).astype(acc)
        table = param(self, "pos_embed", dense_init(self.init_std), (c.num_position_embeddings, c.hidden_size),
                      self.param_dtype, (None, "embed"))
        x = x + jnp.sum(table[pos_taps_IN4].astype(acc) * pos_weights_IN4[..., None].astype(acc), axis=-2)
        cos, sin = vision_rope_cos_sin(rowcol_IN2, c.head_dim, c.rope_theta)
        mask = frame_IN[:, :, None] == frame_IN[:, None, :]
        blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, self.dtype, self.param_dtype, name="blocks")(x, cos, sin, mask)
        y = PatchMerger(c, self.out_size, self.dtype, self.param_dtype, name="merger")(x).astype(acc)
        return y.reshape(-1, self.out_size)
