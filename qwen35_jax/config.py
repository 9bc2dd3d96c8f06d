"""Model configuration: frozen dataclass, presets as YAML data, `key=value` overrides, validation, counts.

Dimension letters used across the code base (shapes in names, e.g. `x_BTD`):
B batch, T time, D hidden, H heads, K key/head dim, V value dim, E experts, F ffn width, C chunk, S segments.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Token mixers by name; one letter each for compact patterns such as "GGGA".
MIXER_LETTERS = {
    "G": "gdn",  # Gated DeltaNet (Qwen3.5 linear attention)
    "A": "attn",  # gated softmax attention (Qwen3.5 full attention, elementwise sigmoid gate)
}
HF_MIXER_NAMES = {"linear_attention": "gdn", "full_attention": "attn"}
FFN_KINDS = ("mlp", "moe")
FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and the problem."""


def known_mixers() -> tuple[str, ...]:
    from qwen35_jax.layers import MIXERS  # late import: layers import this module

    return tuple(MIXERS)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling beyond the pretraining context; `rope_type` "yarn" (YaRN, as transformers computes it).

    `factor`: context extension ratio; `original_max_position_embeddings`: the pretraining context; `beta_fast` /
    `beta_slow`: rotation counts bounding the interpolation ramp; `attention_factor` (None: from `factor`, `mscale`
    and `mscale_all_dim` as transformers infers it) multiplies cos and sin; `truncate`: round the ramp bounds.
    """

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


ROPE_TYPES = ("yarn",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole model contract. Defaults are the Qwen3.5 conventions; sizes come from presets."""

    name: str = "custom"
    family: str = "qwen3_5_moe"  # Hugging Face family used for import/export
    vocab_size: int = 4096
    hidden_size: int = 128  # D
    num_layers: int = 4
    layer_pattern: tuple[str, ...] | str = ("gdn", "gdn", "gdn", "attn")  # tiled to num_layers
    mlp_only_layers: tuple[int, ...] = ()  # MoE models: layers that use a dense MLP instead
    # Gated attention.
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rotary_fraction: float = 0.25
    rope_theta: float = 1.0e7
    attn_output_gate: str = "elementwise"  # "elementwise" (Qwen3.5), "headwise", "none"
    sliding_window: int = 0  # 0: full causal attention
    # Gated DeltaNet.
    gdn_num_key_heads: int = 2
    gdn_num_value_heads: int = 4
    gdn_key_dim: int = 32
    gdn_value_dim: int = 32
    gdn_conv_kernel: int = 4
    gdn_chunk_size: int = 64
    gdn_impl: str = "auto"  # "auto", "xla", "pallas", "recurrent"
    # Feed-forward.
    intermediate_size: int = 512  # dense SwiGLU width (dense models and mlp_only_layers)
    num_experts: int = 8  # 0: dense model
    experts_per_token: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    moe_impl: str = "auto"  # grouped-matmul implementation
    capacity_factor: float = 0.0  # 0: dropless
    # Norms, embeddings, positions.
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    mrope_section: tuple[int, ...] = (11, 11, 10)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; a mapping in YAML ({rope_type: yarn, factor: 4, ...})
    # Multi-token prediction.
    mtp_num_layers: int = 0
    # Numerics and compilation.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    scan_layers: bool = True
    remat: str = "none"  # "none", "full", "dots", "dots_no_batch"
    # Token ids (for generation and data).
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        set_("layer_pattern", expand_pattern(self.layer_pattern, self.num_layers))
        set_("mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        set_("mrope_section", tuple(int(i) for i in self.mrope_section))
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", _rope_scaling_from_dict(self.rope_scaling, self.name))
        validate(self)

    # ----- derived shapes -----
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def ffn_pattern(self) -> tuple[str, ...]:
        if not self.is_moe:
            return ("mlp",) * self.num_layers
        return tuple("mlp" if i in self.mlp_only_layers else "moe" for i in range(self.num_layers))

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """(mixer, ffn) per layer: what the scanned stack repeats."""
        return tuple(zip(self.layer_pattern, self.ffn_pattern))

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.rotary_fraction))

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_num_key_heads * self.gdn_key_dim + self.gdn_num_value_heads * self.gdn_value_dim

    def replace(self, **overrides) -> "ModelConfig":
        return from_dict({**to_dict(self), **overrides})

    # ----- the contract: parameter counts and FLOPs -----
    def param_counts(self) -> dict[str, int]:
        return param_counts(self)

    def flops_per_token(self, seq_len: int) -> float:
        return train_flops_per_token(self, seq_len)


def _rope_scaling_from_dict(d: dict, name: str) -> RopeScaling:
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    for k in d:
        if k not in known:
            raise ConfigError(f"model config {name!r}: unknown rope_scaling key {k!r}{_nearest(k, known)}")
    return RopeScaling(**d)


# ---------------------------------------------------------------------------------------------------------------
# Patterns


def expand_pattern(pattern, num_layers: int) -> tuple[str, ...]:
    """"GGGA", ("gdn", "attn"), or HF `layer_types` -> a tuple of `num_layers` mixer names (tiled if shorter)."""
    if isinstance(pattern, str):
        if "," in pattern:
            names = [p.strip() for p in pattern.split(",") if p.strip()]
        else:
            names = []
            for ch in pattern:
                if ch not in MIXER_LETTERS:
                    letters = ", ".join(f"{k}={v}" for k, v in MIXER_LETTERS.items())
                    raise ConfigError(f"layer_pattern {pattern!r}: unknown mixer letter {ch!r} (known: {letters})")
                names.append(MIXER_LETTERS[ch])
    else:
        names = [str(p) for p in pattern]
    names = [HF_MIXER_NAMES.get(n, n) for n in names]
    if not names:
        raise ConfigError("layer_pattern is empty")
    if num_layers % len(names):
        raise ConfigError(
            f"layer_pattern has {len(names)} entries, which does not divide num_layers={num_layers}"
        )
    return tuple(names * (num_layers // len(names)))


def register_mixer_letter(letter: str, name: str) -> None:
    """Lets an ablation variant be named by one letter in compact patterns."""
    MIXER_LETTERS[letter] = name


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _nearest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def validate(cfg: ModelConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"model config {cfg.name!r}: {msg}")

    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        need(getattr(cfg, f) > 0, f"{f} must be positive, got {getattr(cfg, f)}")
    need(cfg.family in FAMILIES, f"family {cfg.family!r} is not one of {FAMILIES}")
    mixers = known_mixers()
    for i, m in enumerate(cfg.layer_pattern):
        need(m in mixers, f"layer {i} names unknown mixer {m!r}{_nearest(m, mixers)}; known: {', '.join(mixers)}")
    need(cfg.num_heads % cfg.num_kv_heads == 0,
         f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
    need(cfg.gdn_num_value_heads % cfg.gdn_num_key_heads == 0,
         f"gdn_num_value_heads={cfg.gdn_num_value_heads} is not a multiple of "
         f"gdn_num_key_heads={cfg.gdn_num_key_heads}")
    rot = cfg.head_dim * cfg.rotary_fraction
    need(abs(rot - round(rot)) < 1e-9 and int(round(rot)) % 2 == 0 and 0 <= rot <= cfg.head_dim,
         f"rotary width head_dim*rotary_fraction = {rot:g} must be an even integer <= head_dim")
    need(cfg.attn_output_gate in ("elementwise", "headwise", "none"),
         f"attn_output_gate {cfg.attn_output_gate!r} is not one of elementwise, headwise, none")
    if cfg.is_moe:
        need(0 < cfg.experts_per_token <= cfg.num_experts,
             f"experts_per_token={cfg.experts_per_token} must be in [1, num_experts={cfg.num_experts}]")
        need(cfg.moe_intermediate_size > 0, "moe_intermediate_size must be positive for a MoE model")
    for i in cfg.mlp_only_layers:
        need(0 <= i < cfg.num_layers, f"mlp_only_layers names layer {i}, outside [0, {cfg.num_layers})")
    need(cfg.remat in ("none", "full", "dots", "dots_no_batch"),
         f"remat {cfg.remat!r} is not one of none, full, dots, dots_no_batch")
    for f in ("param_dtype", "dtype"):
        need(getattr(cfg, f) in ("float32", "bfloat16", "float64", "float16"),
             f"{f} {getattr(cfg, f)!r} is not a float dtype name")
    need(cfg.gdn_impl in ("auto", "xla", "pallas", "recurrent"), f"gdn_impl {cfg.gdn_impl!r} is unknown")
    need(cfg.gdn_conv_kernel >= 1, "gdn_conv_kernel must be >= 1")
    rs = cfg.rope_scaling
    if rs is not None:
        need(isinstance(rs, RopeScaling), f"rope_scaling must be a mapping, got {rs!r}")
        need(rs.rope_type in ROPE_TYPES, f"rope_scaling.rope_type {rs.rope_type!r} is not one of {ROPE_TYPES}")
        need(rs.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {rs.factor}")
        need(rs.original_max_position_embeddings > 0,
             f"rope_scaling.original_max_position_embeddings must be positive, got "
             f"{rs.original_max_position_embeddings}")
    need(cfg.mtp_num_layers in (0, 1), f"mtp_num_layers={cfg.mtp_num_layers}: the released design has 0 or 1")


# ---------------------------------------------------------------------------------------------------------------
# Loading: presets, YAML files, overrides


def _field_types() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(ModelConfig)}


def from_dict(d: dict[str, Any], *, source: str = "config") -> ModelConfig:
    fields = _field_types()
    unknown = [k for k in d if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{source}: unknown model key {k!r}{_nearest(k, fields)}")
    kwargs = {}
    for k, v in d.items():
        default = fields[k].default
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{source}: key {k!r} must be true/false, got {v!r}")
        if isinstance(default, float) and isinstance(v, str):
            try:  # YAML 1.1 reads "1e4" as a string
                v = float(v)
            except ValueError:
                pass
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{source}: key {k!r} must be a number, got {v!r}")
            if isinstance(default, int) and not isinstance(v, int):
                raise ConfigError(f"{source}: key {k!r} must be an integer, got {v!r}")
        kwargs[k] = v
    return ModelConfig(**kwargs)


def to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def parse_overrides(items) -> dict[str, Any]:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} with YAML scalars; dicts pass through."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (an empty file is {}); bad YAML or another type is a one-line error."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    return data


def load_config(name_or_path: str | dict | ModelConfig = "tiny", **overrides) -> ModelConfig:
    """A preset name (`configs/model/NAME.yaml`), a YAML path, a mapping or a config, plus overrides."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path.replace(**overrides) if overrides else name_or_path
    if isinstance(name_or_path, dict):
        return from_dict({**name_or_path, **overrides}, source="model mapping")
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "model" / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown model preset {name_or_path!r}{_nearest(str(name_or_path), preset_names())}; "
                f"presets: {', '.join(preset_names())}"
            )
    if not path.exists():
        raise ConfigError(f"model config file {str(path)!r} does not exist")
    data = read_yaml_mapping(path, "model keys")
    data.setdefault("name", path.stem)
    return from_dict({**data, **overrides}, source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Counts


def _mixer_params(cfg: ModelConfig, mixer: str) -> int:
    from qwen35_jax.layers import MIXERS

    return MIXERS[mixer].num_params(cfg)


def _ffn_params(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active) parameters of one FFN."""
    D = cfg.hidden_size
    if kind == "mlp":
        n = 3 * D * cfg.intermediate_size
        return n, n
    expert = 3 * D * cfg.moe_intermediate_size
    shared = 3 * D * cfg.shared_expert_intermediate_size + D if cfg.shared_expert_intermediate_size else 0
    router = D * cfg.num_experts
    return router + cfg.num_experts * expert + shared, router + cfg.experts_per_token * expert + shared


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    D, V = cfg.hidden_size, cfg.vocab_size
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    # "active" counts the weights a token multiplies: the LM head (tied or not), not the embedding gather.
    total = embed + head + D  # final norm
    active = V * D + D
    for mixer, ffn in cfg.layer_kinds:
        m = _mixer_params(cfg, mixer) + 2 * D
        f_total, f_active = _ffn_params(cfg, ffn)
        total += m + f_total
        active += m + f_active
    mtp = 0
    if cfg.mtp_num_layers:
        f_total, _ = _ffn_params(cfg, "moe" if cfg.is_moe else "mlp")
        per = 2 * D + 2 * D * D + D + _mixer_params(cfg, "attn") + 2 * D + f_total
        mtp = cfg.mtp_num_layers * per
    total += mtp
    return {"total": total, "active": active, "embedding": embed + head, "mtp": mtp,
            "non_embedding": total - embed - head}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), for MFU.

    Active matmul parameters (including the LM head, excluding the embedding gather) cost 6 per token. Causal
    attention costs 2 * 2 * H * hd * (mean context) forward. Gated DeltaNet (chunked, chunk C) costs per token and
    value head 2C(3dk + 2dv) + 6 dk dv forward: K K^T, Q K^T, W, U, the in-chunk output and three state products.
    """
    counts = param_counts(cfg)
    flops = 6.0 * counts["active"]
    for mixer in cfg.layer_pattern:
        flops += 3.0 * _mixer_sequence_flops(cfg, mixer, seq_len)
    return flops


def _mixer_sequence_flops(cfg: ModelConfig, mixer: str, seq_len: int) -> float:
    from qwen35_jax.layers import MIXERS

    return MIXERS[mixer].sequence_flops(cfg, seq_len)


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def describe(cfg: ModelConfig, seq_len: int = 4096) -> str:
    c = cfg.param_counts()
    return (f"{cfg.name}: {human(c['total'])} params ({human(c['active'])} active), "
            f"{cfg.num_layers} layers {''.join(k[0].upper() for k in cfg.layer_pattern)}, "
            f"{human(cfg.flops_per_token(seq_len))} train FLOPs/token at T={seq_len}")


__all__ = ["ModelConfig", "ConfigError", "load_config", "from_dict", "to_dict", "parse_overrides",
           "preset_names", "expand_pattern", "describe"]
