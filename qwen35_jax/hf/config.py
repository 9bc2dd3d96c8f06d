"""config.json <-> ModelConfig. Every key of a Hugging Face config either drives the model, is known to leave the
computation unchanged, or is refused with a one-line error naming the key and its value."""

from __future__ import annotations

import dataclasses

from qwen35_jax.config import ModelConfig, RopeScaling, from_dict
from qwen35_jax.hf.common import CheckpointError, dtype_name

TEXT_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next"}
VL_TYPES = {"qwen3_5": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe"}
EXPORT = {
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
    "qwen3_next": ("qwen3_next", "Qwen3NextForCausalLM"),
}
VL_EXPORT = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}

# Keys that do not change what the model computes (bookkeeping, generation defaults, inference switches).
HARMLESS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "output_router_logits", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "keys_to_ignore_at_inference", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "router_aux_loss_coef", "quantization_config", "base_config_key",
    "max_window_layers", "tie_encoder_decoder", "use_bfloat16", "sep_token_id", "decoder_start_token_id",
}
# The VL wrapper's own keys (the vision tower is read through an extension group, or ignored).
VL_HARMLESS = {"vision_config", "text_config", "image_token_id", "video_token_id", "vision_start_token_id",
               "vision_end_token_id", "tie_word_embeddings"} | HARMLESS
# Keys read by `config_from_hf` (their values drive the model).
DRIVEN = {
    "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "full_attention_interval",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters", "rope_scaling", "rope_theta",
    "partial_rotary_factor", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "intermediate_size", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "mtp_num_hidden_layers", "decoder_sparse_step",
    "mlp_only_layers",
}
# Keys accepted only at the value the model implements: {key: (allowed values, what else would mean)}.
PINNED = {
    "hidden_act": (("silu",), "the MLP activation"),
    "attention_bias": ((False, None), "biases on q/k/v/o"),
    "attention_dropout": ((0, 0.0, None), "attention dropout"),
    "attn_output_gate": ((True, None), "the attention output gate"),
    "mamba_ssm_dtype": (("float32", None), "the recurrent state dtype (ours is float32)"),
    "mtp_use_dedicated_embeddings": ((False, None), "separate MTP embeddings"),
    "use_sliding_window": ((False, None), "sliding-window attention"),
    "sliding_window": ((None,), "sliding-window attention"),
}
ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved",
             "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"}
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate")


def _refuse(where, key, value, why):
    raise CheckpointError(f"{where}: {key}={value!r} is not supported ({why})")


def check_fields(d: dict, family: str, where: str) -> None:
    """Refuses every key that would change the computation in a way the model does not implement."""
    for key, value in d.items():
        if key in HARMLESS or key in DRIVEN:
            continue
        if key in PINNED:
            allowed, what = PINNED[key]
            if value not in allowed:
                _refuse(where, key, value, f"{what}; supported: {[a for a in allowed if a is not None]}")
            continue
        _refuse(where, key, value, "unknown config key; it may change the computation")
    if family == "qwen3_5_moe":  # transformers' Qwen3.5-MoE ignores these; a non-default value is ambiguous
        if d.get("norm_topk_prob", True) is not True:
            _refuse(where, "norm_topk_prob", d["norm_topk_prob"], "Qwen3.5-MoE always renormalises the top-k")
        if d.get("mlp_only_layers"):
            _refuse(where, "mlp_only_layers", d["mlp_only_layers"], "Qwen3.5-MoE has no dense layers")
        if d.get("decoder_sparse_step", 1) != 1:
            _refuse(where, "decoder_sparse_step", d["decoder_sparse_step"], "Qwen3.5-MoE has no dense layers")
    if family == "qwen3_5" and d.get("num_experts"):
        _refuse(where, "num_experts", d["num_experts"], "a dense Qwen3.5 config with experts")


def _rope(text: dict, family: str, where: str):
    """(theta, partial factor, mrope section, RopeScaling or None) read as transformers' standardize_rope_params."""
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if text.get("rope_parameters") and text.get("rope_scaling"):
        _refuse(where, "rope_scaling", text["rope_scaling"], "both rope_parameters and rope_scaling are given")
    if any(isinstance(v, dict) for v in rope.values()):
        _refuse(where, "rope_parameters", rope, "per-layer-type rope parameters")
    for k in rope:
        if k not in ROPE_KEYS:
            _refuse(where, f"rope_parameters.{k}", rope[k], "unknown rope parameter")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    section = tuple(rope.get("mrope_section", (11, 11, 10)))
    if family == "qwen3_next" and ("mrope_section" in rope or "mrope_interleaved" in rope):
        _refuse(where, "rope_parameters.mrope_section", rope.get("mrope_section"), "Qwen3-Next has no mRoPE")
    if family != "qwen3_next" and rope.get("mrope_interleaved", True) is not True:
        _refuse(where, "rope_parameters.mrope_interleaved", rope["mrope_interleaved"], "only interleaved mRoPE")
    if rope_type == "default":
        extra = [k for k in YARN_KEYS if k in rope]
        if extra:
            _refuse(where, f"rope_parameters.{extra[0]}", rope[extra[0]], "a scaling key with rope_type default")
        return theta, partial, section, None
    if rope_type != "yarn":
        _refuse(where, "rope_parameters.rope_type", rope_type, "implemented: default, yarn")
    original = rope.get("original_max_position_embeddings", text.get("original_max_position_embeddings"))
    original = int(original or text.get("max_position_embeddings", 32768))
    factor = rope.get("factor")
    if factor is None:  # transformers: the ratio of the extended to the original context
        factor = text.get("max_position_embeddings", 32768) / original
    scaling = RopeScaling(
        rope_type="yarn", factor=float(factor), original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
        attention_factor=None if rope.get("attention_factor") is None else float(rope["attention_factor"]),
        truncate=bool(rope.get("truncate", True)))
    return theta, partial, section, scaling


def config_from_hf(d: dict, *, dtype="float32", compute_dtype=None, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json mapping (text-only or vision-language); unsupported keys are refused."""
    model_type = d.get("model_type")
    if model_type in VL_TYPES:
        family = VL_TYPES[model_type]
        for key, value in d.items():
            if key not in VL_HARMLESS:
                _refuse(where, key, value, "unknown key of a vision-language config")
        text = dict(d.get("text_config") or {})
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        text.pop("model_type", None)
        where = f"{where} text_config"
    elif model_type in TEXT_TYPES:
        text, family = d, TEXT_TYPES[model_type]
        tie = d.get("tie_word_embeddings", False)
    else:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not one of "
                              f"{sorted(set(TEXT_TYPES) | set(VL_TYPES))}")
    check_fields(text, family, where)
    theta, partial, section, scaling = _rope(text, family, where)
    n = text["num_hidden_layers"]
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % text.get("full_attention_interval", 4) == 0 else "linear_attention"
        for i in range(n)]
    num_experts = 0 if family == "qwen3_5" else text.get("num_experts", 0)
    mlp_only = []
    if family == "qwen3_next" and num_experts:
        step = text.get("decoder_sparse_step", 1)
        mlp_only = [i for i in range(n) if i in (text.get("mlp_only_layers") or []) or (i + 1) % step != 0]
    dtype = dtype_name(dtype)
    kw = dict(
        name=d.get("_name_or_path") or model_type, family=family, vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"], num_layers=n, layer_pattern=tuple(layer_types), mlp_only_layers=mlp_only,
        num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        rotary_fraction=partial, rope_theta=theta, mrope_section=section, rope_scaling=scaling,
        gdn_num_key_heads=text["linear_num_key_heads"], gdn_num_value_heads=text["linear_num_value_heads"],
        gdn_key_dim=text["linear_key_head_dim"], gdn_value_dim=text["linear_value_head_dim"],
        gdn_conv_kernel=text.get("linear_conv_kernel_dim", 4),
        intermediate_size=text.get("intermediate_size") or 0, num_experts=num_experts,
        experts_per_token=text.get("num_experts_per_tok", 1) if num_experts else 1,
        moe_intermediate_size=text.get("moe_intermediate_size", 0) if num_experts else 0,
        shared_expert_intermediate_size=text.get("shared_expert_intermediate_size", 0) if num_experts else 0,
        norm_topk_prob=bool(text.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.001)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(tie),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        initializer_range=float(text.get("initializer_range", 0.02)),
        mtp_num_layers=int(text.get("mtp_num_hidden_layers", 0) or 0),
        param_dtype=dtype, dtype=dtype_name(compute_dtype) if compute_dtype is not None else dtype,
        bos_token_id=_first(text.get("bos_token_id", d.get("bos_token_id"))),
        eos_token_id=_first(text.get("eos_token_id", d.get("eos_token_id"))),
        pad_token_id=_first(text.get("pad_token_id", d.get("pad_token_id"))),
    )
    return from_dict(kw, source=where)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


def rope_to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction}
    if cfg.family != "qwen3_next":
        rope.update(mrope_section=list(cfg.mrope_section), mrope_interleaved=True)
    rs = cfg.rope_scaling
    if rs is not None:
        rope.update(rope_type=rs.rope_type, factor=rs.factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                    beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        if rs.mscale:
            rope["mscale"] = rs.mscale
        if rs.mscale_all_dim:
            rope["mscale_all_dim"] = rs.mscale_all_dim
        if rs.attention_factor is not None:
            rope["attention_factor"] = rs.attention_factor
    return rope


def config_to_hf(cfg: ModelConfig, *, vision_language: bool = False, vision_config: dict | None = None) -> dict:
    """The config.json of a text-only checkpoint, or (`vision_language`) of the VL wrapper releases ship."""
    bad = [m for m in cfg.layer_pattern if m not in ("gdn", "attn")]
    if (bad or cfg.attn_output_gate != "elementwise" or cfg.sliding_window or not cfg.attn_qk_norm
            or not cfg.gdn_qk_l2norm):
        raise CheckpointError(f"config {cfg.name!r} is an ablation variant (mixers {sorted(set(bad))}, gate "
                              f"{cfg.attn_output_gate!r}, window {cfg.sliding_window}, qk norm {cfg.attn_qk_norm}, "
                              f"linear-attention qk l2norm {cfg.gdn_qk_l2norm}); Qwen3.5 checkpoints cannot express it")
    model_type, arch = EXPORT[cfg.family]
    d = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "layer_types": ["full_attention" if m == "attn" else "linear_attention" for m in cfg.layer_pattern],
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_parameters": rope_to_hf(cfg), "linear_num_key_heads": cfg.gdn_num_key_heads,
        "linear_num_value_heads": cfg.gdn_num_value_heads, "linear_key_head_dim": cfg.gdn_key_dim,
        "linear_value_head_dim": cfg.gdn_value_dim, "linear_conv_kernel_dim": cfg.gdn_conv_kernel,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "attention_bias": False, "dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if cfg.intermediate_size:
        d["intermediate_size"] = cfg.intermediate_size
    if cfg.is_moe:
        d.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)
        if cfg.family == "qwen3_next":
            d.update(norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                     mlp_only_layers=list(cfg.mlp_only_layers))
    if cfg.mtp_num_layers:
        d["mtp_num_hidden_layers"] = cfg.mtp_num_layers
    if not vision_language:
        return d
    if cfg.family not in VL_TYPES:
        raise CheckpointError(f"config {cfg.name!r}: family {cfg.family} has no vision-language release layout")
    return {"architectures": [VL_EXPORT[cfg.family]], "model_type": cfg.family, "text_config": d,
            "vision_config": vision_config or {}, "tie_word_embeddings": cfg.tie_word_embeddings,
            "dtype": cfg.param_dtype}


# Fields that only choose how we run (implementation, compilation, precision), never what the model computes.
RUNTIME_FIELDS = {"name", "gdn_chunk_size", "gdn_impl", "moe_impl", "scan_layers", "remat", "remat_scope",
                  "moe_token_chunks", "param_dtype", "dtype",
                  "capacity_factor", "router_aux_loss_coef", "initializer_range", "output_init_scale", "bos_token_id", "eos_token_id",
                  "pad_token_id", "max_position_embeddings"}


def _effective(cfg: ModelConfig) -> dict:
    """The fields that define what `cfg` computes (unused widths of absent parts dropped)."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS}
    if not cfg.is_moe:
        for k in ("experts_per_token", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                  "mlp_only_layers"):
            d.pop(k)
    elif not cfg.mlp_only_layers:
        d.pop("intermediate_size")
    if cfg.family == "qwen3_next":  # no mRoPE
        d.pop("mrope_section")
    return d


def config_mismatch(ours: ModelConfig, theirs: ModelConfig) -> list[str]:
    """'field: ours vs theirs' for every model-defining field that differs (runtime choices are not compared)."""
    a, b = _effective(ours), _effective(theirs)
    keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name in a or f.name in b]
    return [f"{k}: {a.get(k, '(unused)')!r} vs {b.get(k, '(unused)')!r}" for k in keys if a.get(k) != b.get(k)]


def check_same_model(run_cfg: ModelConfig, loaded_cfg: ModelConfig, path) -> None:
    """Refuses to start a run from the HF folder `path` (whose config `hf.load` returned as `loaded_cfg`) when it
    describes another model, naming every differing field (the run's value first)."""
    diff = config_mismatch(run_cfg, loaded_cfg)
    if diff:
        raise CheckpointError(f"{path}: its config.json differs from the run's model ({'; '.join(diff)})")
