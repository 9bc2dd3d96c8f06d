"""The linear-attention family: Gated DeltaNet (Qwen3.5 `linear_attention`) and its ablation siblings.

One module: projections, causal depthwise conv + SiLU, L2-normalised q and k, the per-head output RMSNorm gated by
`silu(z)`, `out_proj`; two switches pick the state update per value head (state S [dk, dv], o = S^T q):
  decay + delta  S = exp(g) S, then S = S + k (beta (v - S^T k))^T   Gated DeltaNet ("gdn", the model's layer)
  delta only     the delta rule with g = 0                         DeltaNet ("deltanet")
  decay only     S = exp(g) S + k v^T                              scalar-decay gated linear attention ("gla")
  neither        S = S + k v^T                                     plain linear attention ("linear")
with g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b); a switch that is off drops its parameters
(`in_proj_a`, `A_log`, `dt_bias` / `in_proj_b`). Plain linear attention has no `q . sum(k)` denominator (unstable,
"The Devil in Linear Transformer"): the L2 norm and the output RMSNorm fix the scale, as flash-linear-attention's
`LinearAttention` with an output norm. `gdn_qk_l2norm: false` drops the q/k L2 norm for the decay-only and plain
members (as GLA, Mamba2 and classic linear attention run; the delta rule refuses it: it is stable only for unit keys).

The state updates come from `pallas_kernels` (`gated_delta_rule`: chunked XLA on CPU/GPU, Pallas on TPU;
`gated_linear_attention`: chunked XLA); this module owns the projections and the per-document handling: padded
positions (segment id 0) are zeroed at the input, and both the conv window and the recurrent state restart at every
document start. Under context parallelism (the sequence split over devices) the conv takes its K-1 columns of
history from the previous device and the state is carried across devices
(`pallas_kernels.gated_delta_rule.context_parallel`: any update affine in the state). On a cache it decodes with
the per-token recurrence, and with a checkpointed cache (a position axis, see `init_cache`) keeps the state after
every token (speculative verification).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, default_impl
from pallas_kernels.gated_delta_rule.context_parallel import context_parallel_gated_delta_rule
from pallas_kernels.gated_delta_rule.reference import recurrent_gated_delta_rule_states
from pallas_kernels.gated_linear_attention import (chunk_gated_linear_attention,
                                                   recurrent_gated_linear_attention_states)
from qwen35_jax.layers.common import accum_dtype, dense, dtypes, param
from qwen35_jax.layers.norms import GatedRMSNorm
from qwen35_jax.layers.short_conv import conv_continue, conv_init, conv_per_shard
from qwen35_jax.schema import ConfigError
from qwen35_jax.sharding import sequence_shards, shard_sequence


DECODE_RECURRENT_MAX = 8  # up to this many new tokens, decoding steps through the recurrence token by token
_HEADS4, _HEADS3, _ROWS = ("batch", "seq", "heads", None), ("batch", "seq", "heads"), ("batch", "seq")


def _without_beta(fn):
    """A gated-linear-attention function called with the delta rule's arguments (q, k, v, g, beta, ...)."""
    return lambda q, k, v, g, beta, **kw: fn(q, k, v, g, **kw)


def chunked_rule(delta: bool, impl: str, **options):
    """The family's chunked state update `rule(q, k, v, g, beta, *, segment_ids, initial_state, ...)` -> (o, state):
    the gated delta rule, or without `delta` the gated linear attention (beta unused; its "auto" is XLA)."""
    if delta:
        return functools.partial(chunk_gated_delta_rule, impl=impl, **options)
    return _without_beta(functools.partial(chunk_gated_linear_attention, impl=impl, **options))


def rule_per_shard(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT, cfg, delta: bool = True):
    """The training-time state update. The Pallas kernel is opaque to XLA's partitioner, so under a mesh it runs per
    shard (batch rows and heads split); with the sequence split too, every implementation runs per shard and carries
    the state across devices. Otherwise the XLA path is left to the partitioner."""
    impl = cfg.gdn_impl
    if impl == "auto":  # the decay-only and plain updates have only the chunked XLA form
        impl = default_impl() if delta else "xla"
    rule = chunked_rule(delta, impl, use_qk_l2norm=cfg.gdn_qk_l2norm, chunk_size=cfg.gdn_chunk_size)

    def local(q, k, v, g, beta, seg, *, axis_name):
        if axis_name is None:
            return rule(q, k, v, g, beta, segment_ids=seg)
        with_state = functools.partial(rule, output_final_state=True)
        return context_parallel_gated_delta_rule(with_state, q, k, v, g, beta, segment_ids=seg,
                                                 axis_name=axis_name), None

    args = (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT)
    if impl != "pallas" and sequence_shards(q_BTHK.shape[1]) == 1:
        return local(*args, axis_name=None)
    return shard_sequence(local, args, (_HEADS4, _HEADS4, _HEADS4, _HEADS3, _HEADS3, _ROWS), (_HEADS4, None))


def a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)


def dt_bias_init(key, shape, dtype, dt_range=(1e-3, 1e-1)):
    """Mamba2 / flash-linear-attention's time-step init: softplus(dt_bias) = dt, log-uniform in `dt_range`
    (the config's `gdn_dt_init_range`, by default [1e-3, 1e-1]).

    transformers fills dt_bias with ones (it only ever loads trained weights): with A = exp(A_log) up to 16 that is
    a per-token decay exp(-1.31 A), so a freshly initialised layer forgets everything within a token or two, and
    the small gradients through that decay keep it there (Gated DeltaNet stayed at chance on MQAR). The log-uniform
    dt gives decays from about 1.0 to exp(-1.6) per token at init.
    """
    lo, hi = dt_range
    log_dt = jax.random.uniform(key, shape, jnp.float32, jnp.log(lo), jnp.log(hi))
    dt = jnp.exp(log_dt)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # the inverse of softplus


class GatedDeltaNet(nn.Module):
    """The family's module; `decay` and `delta` switch the state update (both on: Qwen3.5's Gated DeltaNet)."""

    cfg: object
    decay: bool = True
    delta: bool = True

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids_BT, positions_BT=None, cache=None, cache_index=None):
        cfg = self.cfg
        if self.delta and not cfg.gdn_qk_l2norm:
            raise ConfigError(f"model config {cfg.name!r}: gdn_qk_l2norm=false with a delta-rule mixer: the delta "
                              "rule's update is stable only for unit keys")
        dtype, param_dtype = dtypes(cfg)
        B, T, _ = x_BTD.shape
        Hk, Hv, dk, dv = cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim
        proj = lambda n, axes, name: dense(n, axes, dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                                           std=cfg.initializer_range, name=name)
        x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0).astype(dtype)
        qkv_BTC = proj(cfg.gdn_conv_dim, ("embed", "heads"), "in_proj_qkv")(x_BTD)
        z_BTHV = proj(Hv * dv, ("embed", "heads"), "in_proj_z")(x_BTD).reshape(B, T, Hv, dv)
        f32 = accum_dtype(dtype)  # the conv sums K taps: accumulate in fp32 and round once, as a fused conv does
        beta_BTH = jax.nn.sigmoid(proj(Hv, ("embed", "heads"), "in_proj_b")(x_BTD)) if self.delta else None
        g_BTH = jnp.zeros((B, T, Hv), f32)
        if self.decay:
            a_BTH = proj(Hv, ("embed", "heads"), "in_proj_a")(x_BTD)
        kernel_KC = param(self, "conv1d", conv_init, (cfg.gdn_conv_kernel, cfg.gdn_conv_dim), param_dtype,
                          ("conv", "heads"))
        if cache is None:
            qkv_BTC = conv_per_shard(qkv_BTC, kernel_KC, segment_ids_BT, accum=f32, activation=jax.nn.silu)
        else:  # continue from the last K-1 pre-conv columns of this sequence
            checkpoints = cache["state"].ndim == 5  # per-position layout: continue from the last checkpoint
            conv_BTC, new_conv = conv_continue(cache["conv"], qkv_BTC.astype(f32), kernel_KC.astype(f32),
                                               segment_ids_BT, checkpoints)
            qkv_BTC = jax.nn.silu(conv_BTC).astype(dtype)
        q_BTHK = qkv_BTC[..., : Hk * dk].reshape(B, T, Hk, dk)
        k_BTHK = qkv_BTC[..., Hk * dk: 2 * Hk * dk].reshape(B, T, Hk, dk)
        v_BTHV = qkv_BTC[..., 2 * Hk * dk:].reshape(B, T, Hv, dv)
        if self.decay:
            dt_init = functools.partial(dt_bias_init, dt_range=cfg.gdn_dt_init_range)
            dt_bias = param(self, "dt_bias", dt_init, (Hv,), param_dtype, ("heads",))
            A_log = param(self, "A_log", a_log_init, (Hv,), param_dtype, ("heads",))
            g_BTH = -jnp.exp(A_log.astype(f32)) * jax.nn.softplus(a_BTH.astype(f32) + dt_bias.astype(f32))
        if cache is None:
            o_BTHV, _ = rule_per_shard(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT, cfg, self.delta)
        else:  # a few tokens decode with the per-token recurrence; a prompt uses the chunked form
            valid_BTH = (segment_ids_BT != 0)[..., None]  # padding leaves the carried state untouched
            g_BTH = jnp.where(valid_BTH, g_BTH, 0.0)
            if self.delta:
                beta_BTH = jnp.where(valid_BTH, beta_BTH, 0.0)
            else:  # no beta to zero: padding's k (its input was zeroed, so its conv output is the history's) goes
                k_BTHK = jnp.where(valid_BTH[..., None], k_BTHK, 0.0)
            if checkpoints:  # speculative verify: the state after every token, steps unrolled in one program
                states = (recurrent_gated_delta_rule_states if self.delta
                          else _without_beta(recurrent_gated_linear_attention_states))
                o_BTHV, state = states(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state=cache["state"][:, -1],
                                       use_qk_l2norm=cfg.gdn_qk_l2norm)
            else:
                impl = "recurrent" if T <= DECODE_RECURRENT_MAX else cfg.gdn_impl
                rule = chunked_rule(self.delta, impl, use_qk_l2norm=cfg.gdn_qk_l2norm, chunk_size=cfg.gdn_chunk_size)
                o_BTHV, state = rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state=cache["state"],
                                     output_final_state=True)
            cache = {"conv": new_conv, "state": state}
        y_BTHV = GatedRMSNorm(cfg.rms_norm_eps, param_dtype, name="norm")(o_BTHV.astype(dtype), z_BTHV)
        y = dense(cfg.hidden_size, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, name="out_proj",
                  std=cfg.initializer_range * cfg.output_init_scale)(y_BTHV.reshape(B, T, Hv * dv))
        return y if cache is None else (y, cache)

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype):
        """Constant size in the context length: the conv window [B, K-1, C] and the fp32 delta-rule state
        [B, Hv, dk, dv]. A cache whose leaves carry a position axis after the batch (conv [B, P, K-1, C], state
        [B, P, Hv, dk, dv]: checkpoints) continues from position P-1 and returns the checkpoints after each of the
        T new tokens (speculative verification selects the accepted one; see generation.py)."""
        del max_len
        return {"conv": jnp.zeros((batch, cfg.gdn_conv_kernel - 1, cfg.gdn_conv_dim), dtype),
                "state": jnp.zeros((batch, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim),
                                   jnp.float32)}

    # num_params and sequence_flops read the switches from the class defaults (the registered siblings fix them).
    @classmethod
    def num_params(cls, cfg) -> int:
        D, Hv, dv, C = cfg.hidden_size, cfg.gdn_num_value_heads, cfg.gdn_value_dim, cfg.gdn_conv_dim
        decay, delta = cls._switch("decay"), cls._switch("delta")
        gates = D * Hv * (delta + decay) + 2 * Hv * decay
        return D * C + D * Hv * dv + gates + cfg.gdn_conv_kernel * C + dv + Hv * dv * D

    @classmethod
    def sequence_flops(cls, cfg, seq_len: int) -> float:
        """Forward FLOPs per token of the chunked update (see config.train_flops_per_token): the delta rule's, or
        without it Q K^T and P V in the chunk plus the two state products (Q S, K^T V)."""
        C, dk, dv = min(cfg.gdn_chunk_size, seq_len), cfg.gdn_key_dim, cfg.gdn_value_dim
        if cls._switch("delta"):
            return cfg.gdn_num_value_heads * (2.0 * C * (3 * dk + 2 * dv) + 6.0 * dk * dv)
        return cfg.gdn_num_value_heads * (2.0 * C * (dk + dv) + 4.0 * dk * dv)

    @staticmethod
    def state_size(cfg, seq_len: int) -> int:
        """Floats of decode state per sequence, constant in seq_len: the recurrent state plus the conv window."""
        del seq_len
        return (cfg.gdn_num_value_heads * cfg.gdn_key_dim * cfg.gdn_value_dim
                + (cfg.gdn_conv_kernel - 1) * cfg.gdn_conv_dim)

    @classmethod
    def _switch(cls, name: str) -> int:
        return int(cls.__dataclass_fields__[name].default)


class LinearAttention(GatedDeltaNet):
    """Plain linear attention: S = S + k v^T."""

    decay: bool = False
    delta: bool = False


class GatedLinearAttention(GatedDeltaNet):
    """Scalar-decay gated linear attention (Mamba2 / RetNet style): S = exp(g) S + k v^T."""

    decay: bool = True
    delta: bool = False


class DeltaNet(GatedDeltaNet):
    """DeltaNet: the delta rule without decay (g = 0)."""

    decay: bool = False
    delta: bool = True
