"""Model configuration: frozen dataclass, presets as YAML data, `key=value` overrides, validation, counts.

Dimension letters used across the code base (shapes in names, e.g. `x_BTD`):
B batch, T time, D hidden, H heads, K key/head dim, V value dim, E experts, F ffn width, C chunk, S segments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from qwen35_jax.schema import (ConfigError, apply_overrides, build, field, nearest, parse_overrides, read_yaml_mapping,
                               resolve_file, to_dict)

from qwen35_jax.layers.registry import letter_of, letters, mixer_class, mixer_names, name_of
from qwen35_jax.vision_config import VisionConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

HF_MIXER_NAMES = {"linear_attention": "gdn", "full_attention": "attn"}
FFN_KINDS = ("mlp", "moe")
FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
DTYPE_NAMES = Literal["float32", "bfloat16", "float64", "float16"]


def known_mixers() -> tuple[str, ...]:
    return mixer_names()


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling beyond the pretraining context (ModelConfig.rope_scaling), as transformers computes YaRN."""

    rope_type: Literal["yarn"] = "yarn"  # the scaling method (YaRN)
    factor: float = 1.0  # context extension ratio
    original_max_position_embeddings: int = 0  # the pretraining context the ramp is measured against
    beta_fast: float = 32.0  # rotations bounding the extrapolated (high-frequency) end of the ramp
    beta_slow: float = 1.0  # rotations bounding the interpolated (low-frequency) end of the ramp
    mscale: float = 0.0  # with mscale_all_dim: attention factor from both (DeepSeek style); 0: unset
    mscale_all_dim: float = 0.0  # see mscale; 0: unset
    attention_factor: float | None = None  # multiplies cos and sin; null: 0.1 ln(factor) + 1 (or from mscale)
    truncate: bool = True  # round the ramp bounds to whole dimensions


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole model contract. Defaults are the Qwen3.5 conventions; sizes come from presets.

    Every field is a config key (`qwen35 config model` lists them): its annotation is checked on load and the
    comment ending its line is its doc. Fields must stay hashable (tuples, frozen dataclasses), since compiled
    modules are cached per config.
    """

    name: str = "custom"  # a label for logs and files (presets: the file name)
    family: Literal["qwen3_5", "qwen3_5_moe", "qwen3_next"] = "qwen3_5_moe"  # Hugging Face family (import/export)
    vocab_size: int = 4096  # V: embedding rows and LM-head columns
    hidden_size: int = 128  # D: the residual stream width
    num_layers: int = 4  # decoder layers
    layer_pattern: tuple[str, ...] | str = field(("gdn", "gdn", "gdn", "attn"),
                                                 doc="mixer per layer: GGGA letters, names or HF layer_types; tiled")
    mlp_only_layers: tuple[int, ...] = ()  # MoE models: layers that use a dense MLP instead
    # Gated attention.
    num_heads: int = 4  # query heads of the attention layers
    num_kv_heads: int = 2  # key/value heads (GQA); divides num_heads
    head_dim: int = 32  # attention head width
    rotary_fraction: float = 0.25  # share of head_dim that RoPE rotates (partial RoPE)
    rope_theta: float = 1.0e7  # RoPE base frequency
    attn_output_gate: Literal["elementwise", "headwise", "none"] = "elementwise"  # sigmoid gate on attention output
    attn_qk_norm: bool = True  # RMSNorm on each head's queries and keys (Qwen3.5); false: an ablation, raw logits
    sliding_window: int = 0  # attention window in tokens; 0: full causal attention
    attention_impl: Literal["auto", "xla_dense", "xla_blocked", "splash"] = field(
        "auto", doc="training/prefill attention kernel (pallas_kernels.flash_attention); auto: splash on TPU, "
                    "blocked XLA past 1024 keys elsewhere")
    # Gated DeltaNet.
    gdn_num_key_heads: int = 2  # Gated DeltaNet query/key heads
    gdn_num_value_heads: int = 4  # Gated DeltaNet value heads; a multiple of gdn_num_key_heads
    gdn_key_dim: int = 32  # Gated DeltaNet key head width
    gdn_value_dim: int = 32  # Gated DeltaNet value head width
    gdn_conv_kernel: int = 4  # taps of the causal depthwise conv before q, k, v
    gdn_chunk_size: int = 64  # chunk length of the chunked delta rule (a power of two)
    gdn_impl: Literal["auto", "xla", "pallas", "recurrent"] = "auto"  # delta-rule kernel; auto: pallas on TPU
    gdn_qk_l2norm: bool = field(
        True, doc="unit-norm q and k before the state update (Qwen3.5; the delta rule needs it); false: linear and "
                  "gla without it, as GLA, Mamba2 and classic linear attention run")
    gdn_dt_init_range: tuple[float, float] = field(
        (1e-3, 1e-1), doc="init only: softplus(dt_bias) log-uniform in [lo, hi] (Mamba2/fla); the per-token decay "
                          "rate at init is exp(A_log) * dt")
    # Feed-forward.
    intermediate_size: int = 512  # dense SwiGLU width (dense models and mlp_only_layers)
    num_experts: int = 8  # routed experts; 0: dense model
    experts_per_token: int = 2  # top-k routed experts per token
    moe_intermediate_size: int = 128  # SwiGLU width of each routed expert
    shared_expert_intermediate_size: int = 128  # SwiGLU width of the gated shared expert; 0: none
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss
    moe_impl: Literal["auto", "xla", "pallas", "reference"] = "auto"  # grouped-matmul kernel; auto: pallas on TPU
    capacity_factor: float = 0.0  # expert capacity in units of the balanced load; 0: dropless
    # the routed experts on N strided token slices in turn, each rematerialised; a capacity factor applies per slice
    moe_token_chunks: int = 1  # routed experts on N token slices in turn: 1/N of the dispatch rows live at a time
    # Norms, embeddings, positions.
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = True  # the LM head is the transposed embedding
    max_position_embeddings: int = 262144  # longest sequence the model is meant for
    initializer_range: float = 0.02  # std of the normal init of matrices
    # GPT-2's 1 / sqrt(2 x num_layers) keeps the residual stream's scale at init flat in depth
    output_init_scale: float = 1.0  # o_proj / out_proj / down_proj (experts too) start at initializer_range x this
    mrope_section: tuple[int, ...] = (11, 11, 10)  # multimodal RoPE sections (temporal, height, width)
    rope_scaling: RopeScaling | None = None  # YaRN ({rope_type: yarn, factor: 4, ...}); null: plain RoPE
    # Multi-token prediction.
    mtp_num_layers: int = 0  # MTP heads (0 or 1)
    # Numerics and compilation.
    param_dtype: DTYPE_NAMES = "float32"  # dtype parameters are stored in
    dtype: DTYPE_NAMES = "float32"  # compute dtype
    scan_layers: bool = True  # scan over layer groups (compile time flat in depth) instead of unrolling
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"  # activation rematerialisation per layer
    # the remat unit: sublayer remats norm + mixer and norm + FFN apart (their working sets never live together)
    remat_scope: Literal["block", "sublayer"] = "block"  # remat unit: a whole block, or each sublayer apart
    # Token ids (for generation and data).
    bos_token_id: int | None = None  # beginning-of-sequence id, if any
    eos_token_id: int | None = None  # end-of-sequence id, if any
    pad_token_id: int | None = None  # padding id, if any
    vision: VisionConfig | None = None  # the vision tower (qwen35_jax/vision_config.py); null: text only

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        set_("layer_pattern", expand_pattern(self.layer_pattern, self.num_layers))
        set_("mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        set_("mrope_section", tuple(int(i) for i in self.mrope_section))
        set_("gdn_dt_init_range", tuple(float(v) for v in self.gdn_dt_init_range))
        validate(self)

    @classmethod
    def __config_resolve__(cls, value, where: str) -> dict:
        """A preset name or YAML path, or a mapping `{base: PRESET, ...keys}`, -> a mapping of model keys."""
        if isinstance(value, (str, Path)):
            return preset_mapping(value)
        if isinstance(value, dict) and "base" in value:
            rest = dict(value)
            base = rest.pop("base")
            base_data = cls.__config_resolve__(base, where) if base is not None else {}
            return {**base_data, **rest}  # a modified preset keeps the preset's name
        return value

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
        """A copy with some keys changed, checked like a loaded config."""
        return from_dict({**to_dict(self), **overrides}, source=f"model config {self.name!r}")

    # ----- the contract: parameter counts and FLOPs -----
    def param_counts(self) -> dict[str, int]:
        return param_counts(self)

    def flops_per_token(self, seq_len: int) -> float:
        return train_flops_per_token(self, seq_len)


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
                if name_of(ch) is None:
                    known = ", ".join(f"{k}={v}" for k, v in letters().items())
                    raise ConfigError(f"layer_pattern {pattern!r}: unknown mixer letter {ch!r} (known: {known})")
                names.append(name_of(ch))
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


def pattern_letters(pattern) -> str:
    """The compact form of a pattern of mixer names ("GGGA"): `expand_pattern` reads it back to the same names."""
    return "".join(letter_of(m) for m in pattern)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: ModelConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"model config {cfg.name!r}: {msg}")

    check_choices(cfg, need)
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "gdn_num_key_heads", "gdn_num_value_heads", "gdn_key_dim", "gdn_value_dim", "gdn_chunk_size"):
        need(getattr(cfg, f) > 0, f"{f} must be positive, got {getattr(cfg, f)}")
    for f in ("intermediate_size", "num_experts", "shared_expert_intermediate_size", "sliding_window",
              "mtp_num_layers"):
        need(getattr(cfg, f) >= 0, f"{f} must be >= 0, got {getattr(cfg, f)}")
    mixers = known_mixers()
    for i, m in enumerate(cfg.layer_pattern):
        need(m in mixers, f"layer {i} names unknown mixer {m!r}{nearest(m, mixers)}; known: {', '.join(mixers)}")
    need(cfg.num_heads % cfg.num_kv_heads == 0,
         f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
    need(cfg.gdn_num_value_heads % cfg.gdn_num_key_heads == 0,
         f"gdn_num_value_heads={cfg.gdn_num_value_heads} is not a multiple of "
         f"gdn_num_key_heads={cfg.gdn_num_key_heads}")
    c = cfg.gdn_chunk_size
    need(c & (c - 1) == 0, f"gdn_chunk_size={c} is not a power of two (the chunked kernels need one, e.g. "
                           f"{1 << (c.bit_length() - 1)} or {1 << c.bit_length()})")
    rot = cfg.head_dim * cfg.rotary_fraction
    need(abs(rot - round(rot)) < 1e-9 and int(round(rot)) % 2 == 0 and 0 <= rot <= cfg.head_dim,
         f"rotary width head_dim*rotary_fraction = {rot:g} must be an even integer <= head_dim")
    if cfg.is_moe:
        need(0 < cfg.experts_per_token <= cfg.num_experts,
             f"experts_per_token={cfg.experts_per_token} must be in [1, num_experts={cfg.num_experts}]")
        need(cfg.moe_intermediate_size > 0, "moe_intermediate_size must be positive for a MoE model")
    for i in cfg.mlp_only_layers:
        need(0 <= i < cfg.num_layers, f"mlp_only_layers names layer {i}, outside [0, {cfg.num_layers})")
    need(cfg.gdn_conv_kernel >= 1, "gdn_conv_kernel must be >= 1")
    delta = sorted({"gdn", "deltanet"} & set(cfg.layer_pattern))
    need(cfg.gdn_qk_l2norm or not delta, f"gdn_qk_l2norm=false with delta-rule mixers {delta}: the delta rule's "
                                         "update is stable only for unit keys (false is for linear and gla)")
    dt = cfg.gdn_dt_init_range
    need(len(dt) == 2 and 0 < dt[0] <= dt[1], f"gdn_dt_init_range={list(dt)} must be [lo, hi] with 0 < lo <= hi")
    rs = cfg.rope_scaling
    if rs is not None:
        need(rs.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {rs.factor}")
        need(rs.original_max_position_embeddings > 0,
             f"rope_scaling.original_max_position_embeddings must be positive, got "
             f"{rs.original_max_position_embeddings}")
    need(cfg.mtp_num_layers in (0, 1), f"mtp_num_layers={cfg.mtp_num_layers}: the released design has 0 or 1")
    need(cfg.initializer_range > 0, f"initializer_range must be positive, got {cfg.initializer_range}")
    need(cfg.output_init_scale >= 0, f"output_init_scale must be >= 0, got {cfg.output_init_scale}")
    need(cfg.capacity_factor >= 0, f"capacity_factor must be >= 0, got {cfg.capacity_factor}")
    need(cfg.moe_token_chunks >= 1, f"moe_token_chunks must be >= 1, got {cfg.moe_token_chunks}")


def check_choices(cfg, need) -> None:
    """Choice (Literal) fields hold one of their values even when a config is built directly in Python."""
    import typing

    from qwen35_jax.schema import _hints

    for name, tp in _hints(type(cfg)).items():
        if typing.get_origin(tp) is Literal:
            value, options = getattr(cfg, name), typing.get_args(tp)
            need(value in options, f"{name} {value!r} is not one of {', '.join(options)}{nearest(value, options)}")


# ---------------------------------------------------------------------------------------------------------------
# Loading: presets, YAML files, overrides (the mechanism is qwen35_jax.schema)


def from_dict(d: dict[str, Any], *, source: str = "config") -> ModelConfig:
    """A ModelConfig from a mapping of model keys (a `base:` key starts from that preset)."""
    return build(ModelConfig, ModelConfig.__config_resolve__(dict(d), source), source)


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def preset_mapping(name_or_path) -> dict:
    """The model keys of a preset name (`configs/model/NAME.yaml`) or a YAML path (name defaults to the stem)."""
    path = resolve_file(str(name_or_path), CONFIG_DIR / "model", "model preset")
    data = read_yaml_mapping(path, "model keys")
    data.setdefault("name", path.stem)
    return data


def load_config(name_or_path: str | dict | ModelConfig = "tiny", **overrides) -> ModelConfig:
    """A preset name (`configs/model/NAME.yaml`), a YAML path, a mapping or a config, plus overrides (dotted keys
    reach nested configs)."""
    if isinstance(name_or_path, ModelConfig):
        if not overrides:
            return name_or_path
        data, where = to_dict(name_or_path), f"model config {name_or_path.name!r}"
    elif isinstance(name_or_path, dict):
        data, where = ModelConfig.__config_resolve__(dict(name_or_path), "model mapping"), "model mapping"
    else:
        data = preset_mapping(name_or_path)
        where = str(name_or_path) if str(name_or_path).endswith((".yaml", ".yml")) else f"model config {data['name']!r}"
    return build(ModelConfig, apply_overrides(data, overrides), where)


# ---------------------------------------------------------------------------------------------------------------
# Counts


def _mixer_params(cfg: ModelConfig, mixer: str) -> int:
    return mixer_class(mixer).num_params(cfg)


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
    vision = cfg.vision.num_params(D) if cfg.vision is not None else 0  # the tower runs once per image patch
    total += mtp + vision
    return {"total": total, "active": active, "embedding": embed + head, "mtp": mtp, "vision": vision,
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
    return mixer_class(mixer).sequence_flops(cfg, seq_len)


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def describe(cfg: ModelConfig, seq_len: int = 4096) -> str:
    c = cfg.param_counts()
    return (f"{cfg.name}: {human(c['total'])} params ({human(c['active'])} active), "
            f"{cfg.num_layers} layers {pattern_letters(cfg.layer_pattern)}, "
            f"{human(cfg.flops_per_token(seq_len))} train FLOPs/token at T={seq_len}")


__all__ = ["ModelConfig", "ConfigError", "load_config", "from_dict", "to_dict", "parse_overrides", "preset_mapping",
           "preset_names", "expand_pattern", "pattern_letters", "describe"]
