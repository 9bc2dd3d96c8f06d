"""The vision tower's configuration (ModelConfig.vision): a frozen dataclass; None means a text-only model.

Defaults are the released Qwen3.5 vision encoder (architecture.md section 8): 27 blocks of width 1152, 16 heads,
tanh-GELU MLP 4304, patch 16 x 16 x 2 frames, a 48 x 48 learned position grid, 2 x 2 merger to the text width.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 27  # vision transformer blocks
    hidden_size: int = 1152  # width of the vision transformer
    intermediate_size: int = 4304  # tanh-GELU MLP width
    num_heads: int = 16  # attention heads (head_dim = hidden_size / num_heads)
    in_channels: int = 3  # image channels (RGB)
    patch_size: int = 16  # patch side in pixels
    temporal_patch_size: int = 2  # frames per temporal patch (a still image is duplicated)
    spatial_merge_size: int = 2  # the merger joins merge x merge neighbouring patches into one token
    out_hidden_size: int = 0  # merger output width; 0: the text hidden size
    num_position_embeddings: int = 2304  # learned position grid cells (a square: 48 x 48)
    rope_theta: float = 10000.0  # base of the 2-D axial rotary
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    image_token_id: int = 248056  # <|image_pad|> placeholder id
    video_token_id: int = 248057  # <|video_pad|> placeholder id
    vision_start_token_id: int = 248053  # <|vision_start|> id
    vision_end_token_id: int = 248054  # <|vision_end|> id

    def __post_init__(self):
        from qwen35_jax.schema import ConfigError

        def need(cond, msg):
            if not cond:
                raise ConfigError(f"vision config: {msg}")

        for f in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "num_position_embeddings"):
            need(getattr(self, f) > 0, f"{f} must be positive, got {getattr(self, f)}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        need(self.head_dim % 4 == 0, f"head_dim={self.head_dim} must be a multiple of 4 (2-D rotary halves)")
        side = math.isqrt(self.num_position_embeddings)
        need(side * side == self.num_position_embeddings,
             f"num_position_embeddings={self.num_position_embeddings} is not a square grid")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch: channels * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    def num_params(self, text_hidden: int) -> int:
        D, F, m2 = self.hidden_size, self.intermediate_size, self.spatial_merge_size ** 2
        out = self.out_hidden_size or text_hidden
        block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (2 * D * F + F + D)
        merger = 2 * D + (m2 * D) ** 2 + m2 * D + m2 * D * out + out
        return self.patch_dim * D + D + self.num_position_embeddings * D + self.depth * block + merger

