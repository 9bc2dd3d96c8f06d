"""The token mixers: one (name, class, letter) table. A layer pattern names a mixer per layer, by name
(`("gdn", "attn")`, HF `layer_types`) or by letter (`"GGGA"`); `qwen35 info` prints patterns with these letters.

Classes are named as "module:Class" and imported on first use, so `config.py` reads names and letters without
importing the layers (which import the config). Each class takes `cfg`, is called as
`mixer(x_BTD, segment_ids_BT=..., positions_BT=...)` (plus `cache=`, `cache_index=` when decoding) and provides
`init_cache(cfg, batch, max_len, dtype)`, `num_params(cfg)`, `sequence_flops(cfg, seq_len)`, `state_size(cfg, seq_len)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

_GDN, _VARIANTS = "qwen35_jax.layers.gdn", "qwen35_jax.layers.variants.attention"
# name -> [letter, class or "module:Class"]
_TABLE: dict[str, list] = {
    "gdn": ["G", f"{_GDN}:GatedDeltaNet"],                # Gated DeltaNet (Qwen3.5 linear attention)
    "attn": ["A", "qwen35_jax.layers.attention:GatedAttention"],  # gated softmax attention (Qwen3.5 full attention)
    "softmax": ["F", f"{_VARIANTS}:SoftmaxAttention"],    # ablation siblings: experiments/README.md
    "attn_headwise": ["H", f"{_VARIANTS}:HeadwiseGatedAttention"],
    "swa": ["S", f"{_VARIANTS}:SlidingWindowAttention"],
    "linear": ["L", f"{_GDN}:LinearAttention"],
    "gla": ["M", f"{_GDN}:GatedLinearAttention"],
    "deltanet": ["D", f"{_GDN}:DeltaNet"],
    "conv": ["C", "qwen35_jax.layers.short_conv:ShortConv"],  # zoology's gated short convolution (BaseConv)
}


def register_mixer(name: str, cls, letter: str) -> None:
    """Adds a token mixer (a class, or "module:Class") under `name` and one pattern `letter`."""
    if len(letter) != 1 or not letter.isalpha() or not letter.isupper():
        raise ValueError(f"mixer {name!r}: letter {letter!r} must be one upper-case letter")
    taken = {v[0]: k for k, v in _TABLE.items() if k != name}
    if letter in taken:
        raise ValueError(f"mixer {name!r}: letter {letter!r} is taken by {taken[letter]!r}")
    _TABLE[name] = [letter, cls]


def mixer_names() -> tuple[str, ...]:
    return tuple(_TABLE)


def letter_of(name: str) -> str:
    return _TABLE[name][0]


def name_of(letter: str) -> str | None:
    return next((n for n, (ch, _) in _TABLE.items() if ch == letter), None)


def letters() -> dict[str, str]:
    """letter -> name, in table order."""
    return {ch: n for n, (ch, _) in _TABLE.items()}


def mixer_class(name: str):
    entry = _TABLE.get(name)
    if entry is None:
        raise KeyError(f"unknown token mixer {name!r} (known: {', '.join(_TABLE)})")
    if isinstance(entry[1], str):
        module, attr = entry[1].split(":")
        entry[1] = getattr(importlib.import_module(module), attr)
    return entry[1]


class _Classes(Mapping):
    """name -> class, resolved on access (`MIXERS["gdn"]`)."""

    def __getitem__(self, name):
        return mixer_class(name)

    def __iter__(self):
        return iter(_TABLE)

    def __len__(self):
        return len(_TABLE)


MIXERS = _Classes()
