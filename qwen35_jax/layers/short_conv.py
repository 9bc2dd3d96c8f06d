"""The causal short convolution: the depthwise conv inside the linear-attention family (`gdn.py`), its decode
continuation and context-parallel halo, and zoology's gated-convolution token mixer built on it.

`ShortConv` ("conv", letter C) is zoology's `BaseConv` (Arora et al., 2023): y = conv_K(x) * (W x), a causal
depthwise conv of K = `gdn_conv_kernel` taps gated by a linear projection, no attention and no state beyond the
last K-1 inputs. Zoology's MQAR models put one in front of every mixer (layer 0 a BaseConv, layer 1 the mixer under
test): it supplies the previous-token mixing that attention otherwise has to learn from positions, and is the
reason its attention learns recall within a few epochs (experiments/README.md (a3)).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.layers.common import accum_dtype, dense, dtypes, param
from qwen35_jax.sharding import sequence_shards, shard_sequence

_ROWS = ("batch", "seq")


def conv_init(key, shape, dtype):
    # torch's Conv1d default (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = kernel size.
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def causal_depthwise_conv(x_BTC, kernel_KC, segment_ids_BT):
    """out[t] = sum_j kernel[j] * x[t - (K-1) + j], taps outside the current document contribute zero."""
    K = kernel_KC.shape[0]
    T = x_BTC.shape[1]
    out = x_BTC * kernel_KC[K - 1]
    for lag in range(1, min(K, T + 1)):
        shifted = jnp.pad(x_BTC, ((0, 0), (lag, 0), (0, 0)))[:, :T]
        seg = jnp.pad(segment_ids_BT, ((0, 0), (lag, 0)), constant_values=-1)[:, :T]
        same = (seg == segment_ids_BT)[..., None]
        out = out + jnp.where(same, shifted, 0) * kernel_KC[K - 1 - lag]
    return out


def last_valid_columns(window_BWC, segment_ids_BT, n: int):
    """The `n` pre-conv columns that end at each row's last non-padding token (trailing padding, as in a speculative
    verify step that commits only a prefix, is skipped; leading padding needs nothing: its columns are zero)."""
    W, T = window_BWC.shape[1], segment_ids_BT.shape[1]
    trailing = jnp.sum(jnp.cumprod((segment_ids_BT == 0)[:, ::-1].astype(jnp.int32), axis=1), axis=1)
    trailing = jnp.where(trailing == T, 0, trailing)  # an all-padding row keeps the plain tail
    take = lambda w, t: jax.lax.dynamic_slice_in_dim(w, W - n - t, n, axis=0)  # noqa: E731
    return jax.vmap(take)(window_BWC, trailing)


def conv_per_shard(x_BTC, kernel_KC, segment_ids_BT, *, accum=jnp.float32, activation=None):
    """`activation(causal_depthwise_conv(x, kernel))` accumulated in `accum` and rounded once to x's dtype; with the
    sequence split over devices, each first receives the last K-1 columns (and their segment ids) of the previous
    device's slice (the first device: zeros, i.e. nothing before the start). The upcast, the conv and the
    activation run inside the per-device function, so only x's dtype crosses the `shard_map` boundary (both ways
    in the backward)."""

    def conv(x, w, seg):
        out = causal_depthwise_conv(x.astype(accum), w.astype(accum), seg)
        return (out if activation is None else activation(out)).astype(x.dtype)

    n = sequence_shards(x_BTC.shape[1])
    if n == 1 or x_BTC.shape[1] // n < kernel_KC.shape[0] - 1:  # no split, or slices shorter than the history
        return conv(x_BTC, kernel_KC, segment_ids_BT)  # (e.g. an 8-token init): XLA partitions it

    def local(x, w, seg, *, axis_name):
        halo = w.shape[0] - 1
        if axis_name is None or halo == 0:
            return (conv(x, w, seg),)
        n = jax.lax.axis_size(axis_name)
        prev = lambda a: jax.lax.ppermute(a[:, -halo:], axis_name, [(i, i + 1) for i in range(n - 1)])  # noqa: E731
        xs, segs = jnp.concatenate([prev(x), x], axis=1), jnp.concatenate([prev(seg), seg], axis=1)
        return (conv(xs, w, segs)[:, halo:],)

    (out,) = shard_sequence(local, (x_BTC, kernel_KC, segment_ids_BT), (_ROWS + (None,), (None, None), _ROWS),
                            (_ROWS + (None,),))
    return out


def conv_continue(window_conv, x_BTC, kernel_KC, segment_ids_BT, checkpoints: bool):
    """Decoding: the conv over T new columns continuing from the cached K-1 pre-conv columns `window_conv`
    ([B, K-1, C], or [B, P, K-1, C] checkpointed: continue from the last). Returns (conv [B, T, C], new window:
    [B, K-1, C] ending at each row's last non-padding token, or [B, T, K-1, C] ending at every new token)."""
    T, K1 = x_BTC.shape[1], kernel_KC.shape[0] - 1
    last = window_conv[:, -1] if checkpoints else window_conv
    window = jnp.concatenate([last.astype(x_BTC.dtype), x_BTC], axis=1)
    conv_BTC = causal_depthwise_conv(window, kernel_KC, jnp.ones(window.shape[:2], jnp.int32))[:, -T:]
    if checkpoints:
        new = jnp.stack([window[:, t + 1: t + 1 + K1] for t in range(T)], axis=1)
    else:
        new = last_valid_columns(window, segment_ids_BT, K1)
    return conv_BTC, new.astype(window_conv.dtype)


class ShortConv(nn.Module):
    """Zoology's gated short convolution: y = conv_K(x) * (x W), per document (taps never cross a document start;
    padding is zeroed). Its decode cache is the conv window, under "state" so that the checkpointed layout of
    speculative verification (`model.checkpoint_cache`) keeps one window per verified position."""

    cfg: object

    @nn.compact
    def __call__(self, x_BTD, *, segment_ids_BT, positions_BT=None, cache=None, cache_index=None):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        D, K = cfg.hidden_size, cfg.gdn_conv_kernel
        f32 = accum_dtype(dtype)
        x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0).astype(dtype)
        u_BTD = dense(D, ("embed", None), dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range,
                      name="in_proj")(x_BTD)
        kernel_KD = param(self, "conv1d", conv_init, (K, D), param_dtype, ("conv", None)).astype(f32)
        if cache is None:
            conv_BTD = conv_per_shard(x_BTD, kernel_KD, segment_ids_BT, accum=f32)
        else:
            conv_BTD, window = conv_continue(cache["state"], x_BTD.astype(f32), kernel_KD, segment_ids_BT,
                                             cache["state"].ndim == 4)
        y_BTD = conv_BTD.astype(dtype) * u_BTD
        return y_BTD if cache is None else (y_BTD, {"state": window})

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int, dtype):
        del max_len
        return {"state": jnp.zeros((batch, cfg.gdn_conv_kernel - 1, cfg.hidden_size), dtype)}

    @staticmethod
    def num_params(cfg) -> int:
        return cfg.hidden_size * (cfg.hidden_size + cfg.gdn_conv_kernel)

    @staticmethod
    def sequence_flops(cfg, seq_len: int) -> float:
        """Forward FLOPs per token beyond the projection: K multiply-adds and the gate product per channel."""
        del seq_len
        return (2.0 * cfg.gdn_conv_kernel + 1.0) * cfg.hidden_size

    @staticmethod
    def state_size(cfg, seq_len: int) -> int:
        del seq_len
        return (cfg.gdn_conv_kernel - 1) * cfg.hidden_size
