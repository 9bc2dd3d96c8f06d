"""Gated softmax attention (Qwen3.5 `full_attention`): GQA, q/k zero-centred norms, partial RoPE, sigmoid output gate.

`q_proj` emits, per head, the query followed by its gate (`[Hq, hd + gate_width]`, interleaved per head). The gate is
elementwise (`gate_width = hd`, Qwen3.5, "G1" in the Gated Attention paper), headwise (`gate_width = 1`) or absent.
It multiplies the attention output before `o_proj`.

Training and prefill without a cache never form the [T, T] scores unless `attention_impl` picks the dense path
(`pallas_kernels.flash_attention`: blocked online softmax in XLA, splash on TPU). Under context parallelism each
device holds a slice of the queries and gathers the keys and values of the whole sequence (`attend`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import target
from pallas_kernels.flash_attention import flash_attention, resolve_impl
from qwen35_jax.layers.common import accum_dtype, dense, dtypes, same_segment_BTT
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.mrope import mrope_cos_sin
from qwen35_jax.layers.rope import apply_rope, rope_cos_sin
from qwen35_jax.sharding import head_shards, sequence_shards, shard_sequence

NEG_INF = -1e30


def gate_width(cfg) -> int:
    return {"elementwise": cfg.head_dim, "headwise": 1, "none": 0}[cfg.attn_output_gate]


def attention_mask_BTS(segment_ids_BT, positions_BT=None, sliding_window: int = 0):
    """Causal, same-document (and optionally sliding-window) mask [B, T, S] over one sequence."""
    T = segment_ids_BT.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    mask = causal & same_segment_BTT(segment_ids_BT)
    if sliding_window:
        idx = jnp.arange(T)
        mask = mask & ((idx[:, None] - idx[None, :]) < sliding_window)[None]
    return mask


def update_kv_cache(cache, index, k_BTGK, v_BTGK, segment_ids_BT, sliding_window: int = 0):
    """Writes T new keys/values at slot `index` (k after norm and RoPE; a scalar, or [B] per-row slots as in batched
    speculative decoding, where rows accept different numbers of drafts); returns the cache, all keys/values and the
    [B, T, S] mask: causal over slots, padded slots (segment id 0) never attended."""
    T, S = k_BTGK.shape[1], cache["k"].shape[1]
    put = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), i, axis=1)  # noqa: E731
    if jnp.ndim(index):
        put = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), i, axis=0))
    k, v = put(cache["k"], k_BTGK, index), put(cache["v"], v_BTGK, index)
    valid = put(cache["valid"], segment_ids_BT != 0, index)
    q_slot = jnp.reshape(index, (-1, 1)) + jnp.arange(T)  # [1 or B, T]
    k_slot = jnp.arange(S)
    causal = k_slot[None, None, :] <= q_slot[:, :, None]
    if sliding_window:
        causal = causal & (q_slot[:, :, None] - k_slot[None, None, :] < sliding_window)
    mask = causal & valid[:, None, :]
    mask = mask | (k_slot[None, None, :] == q_slot[:, :, None])  # a padded query attends to itself (no NaN)
    return {"k": k, "v": v, "valid": valid}, k, v, mask


def softmax_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, *, return_probs=False):
    """GQA softmax attention in fp32; query head h reads kv head h // (H / G)."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    logits = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, k_BSGK, preferred_element_type=accum_dtype(q_BTHK.dtype))
    logits = logits * (K ** -0.5)
    logits = jnp.where(mask_BTS[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BGRTS,BSGK->BTGRK", probs.astype(v_BSGK.dtype), v_BSGK)
    out = out.reshape(B, T, H, K)
    return (out, probs.reshape(B, H, T, -1)) if return_probs else out


_HEADS = ("batch", "seq", "heads", None)


def attend(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, cfg):
    """Causal same-document (windowed) attention over whole sequences, o [B, T, H, K], by `cfg.attention_impl`.

    With the sequence split over devices, each computes its own queries against the keys and values of the whole
    sequence, all-gathered: with grouped-query attention K and V are H / G times smaller than the queries, so
    gathering them costs less than ring attention's rotations, and the kernels skip key blocks past the causal
    bound (shard s reads (s + 1) / N of them). The gradient of the gather is a reduce-scatter of dK, dV."""
    B, T, H, K = q_BTHK.shape
    n_seq = sequence_shards(T)
    impl = resolve_impl(cfg.attention_impl, T // n_seq, T, K)
    kernel = None
    if impl == "splash":
        from pallas_kernels.flash_attention.splash import make_kernel

        kernel = make_kernel(T, T, H, cfg.sliding_window, q_seq_shards=n_seq,
                             head_shards=head_shards((H, k_BTGK.shape[2])), interpret=not target.on_tpu())

    def local(q, k, v, seg, kern, *, axis_name):
        kv_seg, offset = seg, 0
        if axis_name is not None:
            gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
            k, v, kv_seg = gather(k), gather(v), gather(seg)
            offset = jax.lax.axis_index(axis_name) * q.shape[1]
        return (flash_attention(q, k, v, seg, kv_seg, q_offset=offset, sliding_window=cfg.sliding_window,
                                impl=impl, kernel=kern),)

    (out,) = shard_sequence(local, (q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, kernel),
                            (_HEADS, _HEADS, _HEADS, ("batch", "seq"), "kernel"), (_HEADS,))
    return out


class GatedAttention(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids_BT, positions_BT, cache=None, cache_index=None, return_probs=False):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        B, T, _ = x_BTD.shape
        H, G, K, W = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, gate_width(cfg)
        proj = lambda n, axes, name: dense(n, axes, dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                                           std=cfg.initializer_range, name=name)
        qg_BTHX = proj(H * (K + W), ("embed", "heads"), "q_proj")(x_BTD).reshape(B, T, H, K + W)
        q_BTHK, gate = qg_BTHX[..., :K], qg_BTHX[..., K:]
        k_BTGK = proj(G * K, ("embed", "kv_heads"), "k_proj")(x_BTD).reshape(B, T, G, K)
        v_BTGK = proj(G * K, ("embed", "kv_heads"), "v_proj")(x_BTD).reshape(B, T, G, K)
        if cfg.attn_qk_norm:
            norm = lambda name: RMSNorm(cfg.rms_norm_eps, param_dtype, name=name)  # noqa: E731
            q_BTHK, k_BTGK = norm("q_norm")(q_BTHK), norm("k_norm")(k_BTGK)
        if positions_BT.ndim == 3:  # [3, B, T] mRoPE rows (vision inputs)
            cos, sin = mrope_cos_sin(positions_BT, cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section, dtype,
                                     scaling=cfg.rope_scaling)
        else:
            cos, sin = rope_cos_sin(positions_BT, cfg.rotary_dim, cfg.rope_theta, dtype, cfg.rope_scaling)
        q_BTHK, k_BTGK = apply_rope(q_BTHK, cos, sin), apply_rope(k_BTGK, cos, sin)
        probs = None
        if cache is None and not return_probs:
            out_BTHK = attend(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, cfg)
        else:
            if cache is None:
                mask = attention_mask_BTS(segment_ids_BT, positions_BT, cfg.sliding_window)
            else:
                cache, k_BTGK, v_BTGK, mask = update_kv_cache(cache, cache_index, k_BTGK, v_BTGK, segment_ids_BT,
                                                              cfg.sliding_window)
            out = softmax_attention(q_BTHK, k_BTGK, v_BTGK, mask, return_probs=return_probs)
            out_BTHK, probs = out if return_probs else (out, None)
        if W:
            out_BTHK = out_BTHK * jax.nn.sigmoid(gate)
        y = dense(cfg.hidden_size, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, name="o_proj",
                  std=cfg.initializer_range * cfg.output_init_scale)(out_BTHK.reshape(B, T, H * K).astype(dtype))
        if return_probs:
            self.sow("intermediates", "attn_probs", probs)
        return y if cache is None else (y, cache)

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype):
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "valid": jnp.zeros((batch, max_len), bool)}

    @staticmethod
    def num_params(cfg) -> int:
        D, H, G, K = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return D * H * (K + gate_width(cfg)) + 2 * D * G * K + H * K * D + (2 * K if cfg.attn_qk_norm else 0)

    @staticmethod
    def sequence_flops(cfg, seq_len: int) -> float:
        """Forward FLOPs per token of the score and value products (causal: mean context (T+1)/2)."""
        ctx = (seq_len + 1) / 2 if not cfg.sliding_window else min(cfg.sliding_window, (seq_len + 1) / 2)
        return 4.0 * cfg.num_heads * cfg.head_dim * ctx

    @staticmethod
    def state_size(cfg, seq_len: int) -> int:
        """Floats of KV cache per sequence: keys and values for every cached position (the window, if any)."""
        cached = min(cfg.sliding_window, seq_len) if cfg.sliding_window else seq_len
        return 2 * cfg.num_kv_heads * cfg.head_dim * cached
