"""FP8 training (`precision: fp8`): qwix quantized training of the model's matmuls, FP32 master state.

The recipe is MaxText's `fp8_full` through qwix 0.1.8: e4m3 weights and activations in the forward, e5m2
gradients in the backward, current (dynamic, absmax) scaling recomputed every step from the tensor itself. Only
the matmuls named by `Fp8Config` are quantized; qwix's Linen interception (`qwix.quantize_model`) rewrites
`lax.dot_general` inside the matching modules only, so everything else keeps running as `precision: bf16` does:

- quantized (per layer kind): attention q/k/v/o projections, Gated DeltaNet in_proj_qkv / in_proj_z / out_proj,
  dense and shared-expert SwiGLU projections, the routed experts' grouped matmuls (`pallas_kernels.gmm.gmm_fp8`,
  reached through qwix's `get_current_rule("gmm")`, as MaxText's megablox path does), optionally the MTP head and
  the LM head;
- never quantized: the router (`ffn/gate`) and the shared-expert gate, every norm, the GDN a/b gate projections,
  the conv, the delta-rule state and its kernel, the attention scores/softmax (an einsum inside `mixer`, not a
  listed projection), the embedding and the loss (fp32 logits).

Master weights and AdamW state stay fp32 (`param_dtype: float32`); compute is bf16 around the FP8 matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax.numpy as jnp

SCALINGS = ("per_channel", "per_tensor", "per_block")
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2

# Leaf module names of the quantizable projections, by layer kind (layers/attention.py, gdn.py, mlp.py, moe.py).
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
GDN_PROJ = ("in_proj_qkv", "in_proj_z", "out_proj")  # in_proj_a / in_proj_b feed the gates: kept out
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Which layer kinds run their matmuls in FP8 (`precision: fp8` only), and how tensors are scaled.

    scaling: "per_channel" (one scale per token row of activations / per output column of weights / per row or
    column of gradients, qwix's default; the measured best, see benchmarks/README.md), "per_tensor" (one scale per
    tensor), "per_block" (per-channel plus `block`-wide tiles along the contraction axis).
    """

    attention: bool = True  # FP8 q/k/v/o projections of gated attention
    gdn: bool = True  # FP8 Gated DeltaNet in_proj_qkv, in_proj_z, out_proj (never the a/b gate projections)
    mlp: bool = True  # FP8 dense SwiGLU layers and the MoE shared expert
    experts: bool = True  # FP8 routed experts (grouped matmuls, gmm_fp8)
    mtp: bool = False  # FP8 in every matmul of the MTP head
    lm_head: bool = False  # FP8 logits (main and MTP heads)
    scaling: Literal["per_channel", "per_tensor", "per_block"] = "per_channel"  # current (absmax) scaling granularity
    block: int = 128  # contraction tile of per_block scaling

    def validate(self) -> None:
        from qwen35_jax.config import ConfigError

        if self.scaling not in SCALINGS:
            raise ConfigError(f"train config: fp8.scaling {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if self.block <= 0:
            raise ConfigError(f"train config: fp8.block must be positive, got {self.block}")


def _alt(names) -> str:
    return "(" + "|".join(names) + ")"


def rules(fp8: Fp8Config):
    """qwix QtRules in precedence order; module paths are Linen paths such as `layers/block_3/mixer/q_proj`."""
    import qwix

    quant = dict(weight_qtype=E4M3, act_qtype=E4M3, bwd_qtype=E5M2, weight_calibration_method="absmax",
                 act_calibration_method="absmax", bwd_calibration_method="absmax",
                 disable_channelwise_axes=fp8.scaling == "per_tensor")
    if fp8.scaling == "per_block":
        quant.update(tile_size=fp8.block, bwd_weight_grad_tile_size=fp8.block)
    keep = lambda path: qwix.QtRule(module_path=path)  # noqa: E731  (matches, quantizes nothing)
    q = lambda path, ops: qwix.QtRule(module_path=path, op_names=ops, **quant)  # noqa: E731
    out = [] if fp8.mtp else [keep("mtp(/.*)?")]
    kinds = [(fp8.attention, ATTENTION_PROJ, ".*/mixer/"), (fp8.gdn, GDN_PROJ, ".*/mixer/"),
             (fp8.mlp, MLP_PROJ, ".*/ffn/(shared_expert/)?")]
    out += [q(prefix + _alt(names), ("dot_general",)) for on, names, prefix in kinds if on]
    if fp8.experts:
        out.append(q(".*/ffn", ("gmm",)))
    if fp8.mtp:
        out.append(q("mtp/fc", ("dot_general",)))
    if fp8.lm_head:
        out.append(q("", ("dot_general",)))  # the root module computes the logits
    return out


def provider(fp8: Fp8Config):
    """A qwix QtProvider for `fp8` that also records, per (module path, op), whether it quantized it."""
    import qwix

    class RecordingQtProvider(qwix.QtProvider):
        def __init__(self, rules_):
            super().__init__(rules_)
            self.seen: dict[tuple[str, str], bool] = {}

        def _get_current_rule_and_op_id(self, op_name, **kwargs):
            from qwix._src.utils import flax_util

            rule, op_id = super()._get_current_rule_and_op_id(op_name, **kwargs)
            path = "/".join(map(str, flax_util.get_current_module_path()))
            self.seen[(path, op_name)] = rule is not None and rule.weight_qtype is not None
            return rule, op_id

    return RecordingQtProvider(rules(fp8))


@functools.lru_cache(maxsize=32)
def _cached_provider(fp8: Fp8Config):
    return provider(fp8)


def quantize_module(module, fp8: Fp8Config | None):
    """The Linen module with qwix's FP8 interception on its entry points (`module` itself when fp8 is None)."""
    if fp8 is None:
        return module
    import qwix

    return qwix.quantize_model(module, _cached_provider(fp8), methods=("__call__", "mtp_logits", "logits"))


def quantized_ops(fp8: Fp8Config) -> dict[tuple[str, str], bool]:
    """{(module path, op name): quantized?} for every intercepted op traced so far under this recipe."""
    return dict(_cached_provider(fp8).seen)


def gmm_rule():
    """The active qwix rule for the routed experts' grouped matmuls (None outside an FP8 model or when off)."""
    try:
        import qwix.pallas as qpl  # the same `get_current_rule` MaxText's megablox path calls
    except ImportError:
        return None
    rule = qpl.get_current_rule("gmm")
    return rule if rule is not None and rule.weight_qtype is not None else None


def recipe(tcfg) -> Fp8Config | None:
    """The FP8 recipe a training config asks for (None unless `precision: fp8`)."""
    return tcfg.fp8 if tcfg.precision == "fp8" else None
