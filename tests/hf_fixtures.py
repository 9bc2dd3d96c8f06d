"""Tiny random `transformers` models of every family, with the weights that default init hides randomised."""

import math

import numpy as np
import torch

def max_rel_err(ours, ref) -> float:
    """The largest absolute difference relative to the largest magnitude of the reference (float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


FAMILIES = ("qwen3_5_dense_tied", "qwen3_5_dense_untied", "qwen3_5_moe", "qwen3_next")

COMMON = dict(
    vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
# Weights at WEIGHT_SCALE / sqrt(fan_in): random enough to exercise every path, tame enough that bf16 rounding
# does not get amplified chaotically through the layers.
WEIGHT_SCALE = 0.2
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=20)


def hf_config(family: str, **overrides):
    """The tiny config of `family`; `overrides` replace COMMON keys (e.g. a YaRN `rope_parameters`)."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

    common = {**COMMON, **overrides}
    if family.startswith("qwen3_5_dense"):
        cfg = Qwen3_5TextConfig(**common, intermediate_size=48, tie_word_embeddings=family.endswith("_tied"))
    elif family == "qwen3_5_moe":
        cfg = Qwen3_5MoeTextConfig(**common, **MOE, tie_word_embeddings=False)
    elif family == "qwen3_next":
        cfg = Qwen3NextConfig(**common, **MOE, intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=True,
                              tie_word_embeddings=False)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager").eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model, seed: int = 0) -> None:
    """Every weight random, norms far from their init, A_log and dt_bias off their defaults."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=gen)))
        elif name.endswith("dt_bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "norm" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("linear_attn.norm.weight")
                                                                  else 0.0))
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            # Decisive routers: near-ties in top-k would flip under bf16 rounding in any implementation.
            scale = WEIGHT_SCALE * (8.0 if name.endswith("mlp.gate.weight") else 1.0)
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1)) * scale)


@torch.no_grad()
def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask)
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# The MTP head built from transformers' own modules, and folders in the layouts the releases use.


class MTPReference(torch.nn.Module):
    """Qwen3.5's MTP block from transformers' modules: position t takes e = embed(token t+1) and the main model's
    final normed hidden state h_t, u = fc([norm_e(e); norm_h(h)]), one full-attention decoder layer at position
    t, the final norm, and the main model's LM head (predicting token t+2)."""

    def __init__(self, model, seed: int = 1):
        super().__init__()
        import importlib

        config = model.config
        mod = importlib.import_module(type(model).__module__)
        prefix = type(model).__name__.replace("ForCausalLM", "")
        Norm, Layer = getattr(mod, prefix + "RMSNorm"), getattr(mod, prefix + "DecoderLayer")
        D = config.hidden_size
        self.pre_fc_norm_embedding = Norm(D, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Norm(D, eps=config.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * D, D, bias=False)
        self.layers = torch.nn.ModuleList([Layer(config, config.layer_types.index("full_attention"))])
        self.norm = Norm(D, eps=config.rms_norm_eps)
        randomize_(self, seed)
        self.eval()
        self.__dict__["main"] = model  # not a submodule: its weights are the main model's, not the head's

    def mtp_state_dict(self, expert_layout: str = "per_expert") -> dict:
        """`mtp.*` tensors as numpy float32, experts per expert (Qwen3.5 releases) or fused (Qwen3.6)."""
        out = {}
        for name, p in self.named_parameters():
            a = p.detach().float().numpy()
            if expert_layout == "per_expert" and name.endswith("mlp.experts.gate_up_proj"):
                base, inter = name[: -len("gate_up_proj")], a.shape[1] // 2
                for e in range(a.shape[0]):  # gate rows first
                    out[f"mtp.{base}{e}.gate_proj.weight"] = a[e, :inter]
                    out[f"mtp.{base}{e}.up_proj.weight"] = a[e, inter:]
            elif expert_layout == "per_expert" and name.endswith("mlp.experts.down_proj"):
                base = name[: -len("down_proj")]
                for e in range(a.shape[0]):
                    out[f"mtp.{base}{e}.down_proj.weight"] = a[e]
            else:
                out[f"mtp.{name}"] = a
        return out

    @torch.no_grad()
    def forward(self, tokens: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
        tokens = torch.tensor(tokens, dtype=torch.long)
        nxt = torch.tensor(next_tokens, dtype=torch.long)
        B, T = tokens.shape
        h = self.main.model(input_ids=tokens).last_hidden_state
        e = self.main.model.embed_tokens(nxt)
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(h)], dim=-1))
        position_ids = torch.arange(T)[None].expand(B, T)
        position_embeddings = self.main.model.rotary_emb(u, position_ids)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
        u = self.layers[0](u, position_embeddings=position_embeddings, attention_mask=mask, position_ids=position_ids)
        u = u[0] if isinstance(u, tuple) else u
        return self.main.lm_head(self.norm(u)).float().numpy()


def vl_config_dict(model, mtp_layers: int = 1) -> dict:
    """config.json of the vision-language wrapper the releases ship, around `model`'s text config."""
    text = model.config.to_dict()
    text["model_type"] = text["model_type"] if text["model_type"].endswith("_text") else text["model_type"] + "_text"
    text["mtp_num_hidden_layers"] = mtp_layers
    for k in ("architectures", "_name_or_path", "transformers_version", "id2label", "label2id"):
        text.pop(k, None)
    family = text["model_type"][: -len("_text")]
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, num_position_embeddings=16)
    arch = "Qwen3_5MoeForConditionalGeneration" if family == "qwen3_5_moe" else "Qwen3_5ForConditionalGeneration"
    return {"architectures": [arch], "model_type": family, "text_config": text, "vision_config": vision,
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)), "dtype": "float32"}


def write_release(model, mtp: MTPReference, path, *, mtp_experts: str = "per_expert", shards: int = 2,
                  dtype=np.float32, transform=None) -> dict:
    """A folder in the Qwen3.5 release layout, written here independently of `hf.save`: the text tower under
    `model.language_model.` with fused experts (transformers' own parameter layout), `lm_head.weight` and
    `mtp.*` at the top level, `shards` safetensors files plus `model.safetensors.index.json`. `transform(tensors)`
    may rewrite the tensors (e.g. FP8). Returns the tensors written."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        name = "model.language_model." + name[len("model."):] if name.startswith("model.") else name
        tensors[name] = p.detach().float().numpy().astype(dtype)
    tensors.update({k: v.astype(dtype) for k, v in mtp.mtp_state_dict(mtp_experts).items()})
    config = vl_config_dict(model)
    if transform is not None:
        tensors = transform(tensors, config)
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        _save(part, path / fname)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


def _save(tensors: dict, file) -> None:
    """numpy tensors, FP8 ones through torch (safetensors' numpy writer has no float8)."""
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        if v.dtype.name == "float8_e4m3fn":
            out[k] = torch.from_numpy(v.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        elif v.dtype.name == "bfloat16":
            out[k] = torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
    save_file(out, str(file), metadata={"format": "pt"})

# Vision-language checkpoints (Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration)

VL_FAMILIES = ("qwen3_5_vl", "qwen3_5_moe_vl")
# Tiny tower at the release's patch geometry (patch 16, 2 frames, 2 x 2 merge); a 4 x 4 learned grid so that
# images both smaller and larger than it exercise the bilinear resampling.
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=COMMON["hidden_size"],
              num_position_embeddings=16)
VL_TOKENS = dict(vision_start_token_id=93, vision_end_token_id=94, image_token_id=95, video_token_id=96)
MROPE = {**COMMON["rope_parameters"], "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def hf_vl_config(family: str):
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    text = {**COMMON, "rope_parameters": MROPE}
    if family == "qwen3_5_vl":
        cfg = Qwen3_5Config(text_config={**text, "intermediate_size": 48}, vision_config=VISION, **VL_TOKENS,
                            tie_word_embeddings=False)
    elif family == "qwen3_5_moe_vl":
        cfg = Qwen3_5MoeConfig(text_config={**text, **MOE}, vision_config=VISION, **VL_TOKENS,
                               tie_word_embeddings=False)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    for sub in (cfg.text_config, cfg.vision_config):
        sub._attn_implementation = "eager"
    return cfg


def hf_vl_model(family: str, seed: int = 0):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    cls = Qwen3_5ForConditionalGeneration if family == "qwen3_5_vl" else Qwen3_5MoeForConditionalGeneration
    model = cls(hf_vl_config(family)).eval()
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorm scales around 1 (randomize_ centres every norm weight at 0)
        for name, p in model.named_parameters():
            if name.startswith("model.visual.") and "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def mm_token_type_ids(tokens: np.ndarray) -> np.ndarray:
    """What the processor returns beside input_ids: 1 on image placeholders, 2 on video placeholders."""
    return np.where(tokens == VL_TOKENS["image_token_id"], 1, np.where(tokens == VL_TOKENS["video_token_id"], 2, 0))


def vl_prompt(rng, images, videos=(), text=(3, 5, 2, 4), merge: int = 2, vocab: int = 90):
    """Token ids: text runs around `<vs> <image>*n <ve>` blocks (one per image grid) and, per video, per temporal
    patch a timestamp token then `<vs> <video>*n <ve>`; returns tokens [T]."""
    seq, runs = [], iter(text)

    def txt():
        seq.extend(rng.integers(0, vocab, next(runs, 3)).tolist())

    txt()
    for t, h, w in images:
        seq += [VL_TOKENS["vision_start_token_id"]] + [VL_TOKENS["image_token_id"]] * (t * h * w // merge ** 2) \
            + [VL_TOKENS["vision_end_token_id"]]
        txt()
    for t, h, w in videos:
        for _ in range(t):
            seq.append(int(rng.integers(0, vocab)))  # the frame's timestamp
            seq += [VL_TOKENS["vision_start_token_id"]] + [VL_TOKENS["video_token_id"]] * (h * w // merge ** 2) \
                + [VL_TOKENS["vision_end_token_id"]]
        txt()
    return np.asarray(seq, np.int64)


@torch.no_grad()
def hf_vl_logits(model, tokens, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None) -> np.ndarray:
    kw = {"mm_token_type_ids": torch.tensor(mm_token_type_ids(tokens))}
    for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                 ("pixel_values_videos", pixel_values_videos), ("video_grid_thw", video_grid_thw)):
        if v is not None:
            kw[k] = torch.tensor(np.asarray(v))
    return model(input_ids=torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()
