"""The decoder: embeddings, a scanned stack of pre-norm blocks (mixer + FFN), final norm, LM head.

The layer list is periodic (Qwen3.5: three Gated DeltaNet layers then one gated-attention layer); the stack scans
over repetitions of the shortest period, so compile time stays flat in depth and parameters of the period's k-th
block are stacked along a leading `[num_groups]` axis.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen35_jax.config import ModelConfig
from qwen35_jax.multimodal import VISION_KEYS, dummy_vision, fuse_vision, prepare_vision
from qwen35_jax.sharding import constrain
from qwen35_jax.layers import MIXERS, MoE, RMSNorm, SwiGLU
from qwen35_jax.layers.common import accum_dtype, dense, dense_init, dtypes, param, with_axes
from qwen35_jax.layers.vision import VisionTower
from qwen35_jax.precision import quantize_module

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def layer_period(kinds) -> int:
    """Smallest p dividing len(kinds) with kinds[i] == kinds[i % p] (len(kinds) when nothing repeats)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def empty_stats(cfg: ModelConfig):
    E = max(cfg.num_experts, 1)
    z = jnp.zeros((), jnp.float32)
    return {"counts": jnp.zeros((E,), jnp.float32), "probs": jnp.zeros((E,), jnp.float32), "tokens": z, "z_sq": z}


def remat_kwargs(cfg, prevent_cse: bool = True) -> dict:
    return {"policy": REMAT_POLICIES[cfg.remat], "prevent_cse": prevent_cse}


class Block(nn.Module):
    """Pre-norm residual block: `h += mixer(norm(h)); h += ffn(norm(h))`. With `remat_sublayers` each of the two is
    its own remat unit (`remat_scope: sublayer`); parameter names are the same either way."""

    cfg: ModelConfig
    mixer: str
    ffn: str
    remat_sublayers: bool = False

    @nn.compact
    def __call__(self, h_BTD, segment_ids_BT, positions_BT, cache=None, cache_index=None):
        cfg = self.cfg
        mix, ffn = Block._mix, Block._ffn
        if self.remat_sublayers:
            # several units per scan iteration: prevent_cse, else XLA:TPU merges the recomputation with the forward
            mix, ffn = (nn.remat(f, static_argnums=(1,), **remat_kwargs(cfg)) for f in (mix, ffn))
        mixed, cache = mix(self, self.mixer, h_BTD, segment_ids_BT, positions_BT, cache, cache_index)
        h_BTD = h_BTD + mixed.astype(h_BTD.dtype)
        y_BTD, stats = ffn(self, self.ffn, h_BTD, segment_ids_BT)
        return constrain(h_BTD + y_BTD.astype(h_BTD.dtype), ("batch", "seq", "embed")), (stats, cache)

    @staticmethod
    def _norm(cfg, name):
        return RMSNorm(cfg.rms_norm_eps, dtypes(cfg)[1], name=name)

    @staticmethod
    def _mix(block, mixer, h_BTD, segment_ids_BT, positions_BT, cache, cache_index):
        """(mixer(norm(h)), the new cache or None)."""
        cfg = block.cfg
        kwargs = {} if cache is None else {"cache": cache, "cache_index": cache_index}
        mixed = MIXERS[mixer](cfg, name="mixer")(
            Block._norm(cfg, "input_norm")(h_BTD), segment_ids_BT=segment_ids_BT, positions_BT=positions_BT, **kwargs)
        return mixed if cache is not None else (mixed, None)

    @staticmethod
    def _ffn(block, ffn, h_BTD, segment_ids_BT):
        """(ffn(norm(h)), router stats or None)."""
        cfg = block.cfg
        dtype, param_dtype = dtypes(cfg)
        x_BTD = Block._norm(cfg, "post_norm")(h_BTD)
        if ffn == "moe":
            return MoE(cfg, name="ffn")(x_BTD, token_mask_BT=segment_ids_BT != 0)
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype, param_dtype, cfg.initializer_range,
                      cfg.initializer_range * cfg.output_init_scale, name="ffn")(x_BTD), None


def remat_block(cfg, alone_in_scan: bool = False):
    """The block class under the config's remat: Block itself, Block rematerialised whole, or Block with each sublayer
    its own remat unit (`remat_scope: sublayer`)."""
    if cfg.remat == "none":
        return Block
    if cfg.remat_scope == "sublayer":
        return functools.partial(Block, remat_sublayers=True)
    return nn.remat(Block, **remat_kwargs(cfg, prevent_cse=not alone_in_scan))


def head_logits(cfg: ModelConfig, h_BTD, w, d_axis: int):
    """fp32 logits of hidden rows [..., D] against LM-head weights `w` whose axis `d_axis` is D ([V, D]: 1,
    [D, V]: 0), in the compute dtype: the LM head, the draft head ([V', D]) and the verify head ([D, V])."""
    dtype, _ = dtypes(cfg)
    # rows flattened to [N, D] first: with [B, T] rows the weight gradient contracts two axes, and XLA's CPU layout
    # assignment then copied the whole [B, T, V] logits gradient transposed (64 MiB at BENCH_SMALL) before the dot;
    # the head + loss backward is 1.4x faster flat (benchmarks/README.md, "LM head: flat rows")
    lead, D = h_BTD.shape[:-1], h_BTD.shape[-1]
    logits_NV = jax.lax.dot_general(h_BTD.reshape(-1, D).astype(dtype), w.astype(dtype), (((1,), (d_axis,)), ((), ())),
                                    preferred_element_type=accum_dtype(dtype))
    return logits_NV.reshape(*lead, logits_NV.shape[-1])


class Group(nn.Module):
    """One period of the layer pattern; the unit that `nn.scan` repeats."""

    cfg: ModelConfig
    kinds: tuple

    @nn.compact
    def __call__(self, h_BTD, segment_ids_BT, positions_BT, cache=None, cache_index=None):
        cfg = self.cfg
        # A scan iteration holding one block keeps XLA from merging its recomputation with the forward; with several
        # blocks per iteration, the layers unrolled, or a one-iteration scan (which XLA inlines) only prevent_cse
        # does, else remat is undone (tiny-64k-v5e, one 64k row: 3.11 GiB of temporaries with it off, 1.02 with it
        # on; benchmarks/README.md).
        alone = len(self.kinds) == 1 and cfg.scan_layers and len(cfg.layer_kinds) > 1
        block_cls = remat_block(cfg, alone_in_scan=alone)
        stats, new_cache = [], {}
        for j, (mixer, ffn) in enumerate(self.kinds):
            name = f"block_{j}"
            h_BTD, (s, c) = block_cls(cfg, mixer, ffn, name=name)(
                h_BTD, segment_ids_BT, positions_BT, None if cache is None else cache[name], cache_index)
            if s is not None:
                stats.append(s)
            new_cache[name] = c
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None
        return h_BTD, (stacked, new_cache if cache is not None else None)


class MTP(nn.Module):
    """Multi-token prediction head: position t combines the embedding of token t+1 with the main model's final
    hidden state h_t, runs one full-attention decoder layer, and (through the shared LM head) predicts token t+2."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, emb_next_BTD, h_BTD, segment_ids_BT, positions_BT, cache=None, cache_index=None):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, param_dtype, name=name)  # noqa: E731
        x = jnp.concatenate([norm("pre_fc_norm_embedding")(emb_next_BTD), norm("pre_fc_norm_hidden")(h_BTD)], -1)
        u = dense(cfg.hidden_size, (None, "embed"), dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range,
                  name="fc")(x).astype(h_BTD.dtype)
        u, (stats, cache) = remat_block(cfg)(cfg, "attn", "moe" if cfg.is_moe else "mlp", name="layers_0")(
            u, segment_ids_BT, positions_BT, cache, cache_index)
        return norm("norm")(u), stats, cache


class Qwen35(nn.Module):
    """Returns (logits [B, T, V] fp32, aux) where aux holds the final hidden state and router statistics."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        _, param_dtype = dtypes(cfg)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                     embedding_init=with_axes(dense_init(cfg.initializer_range), ("vocab", "embed")))
        kinds = cfg.layer_kinds
        period = layer_period(kinds)
        num_groups = len(kinds) // period
        scanned = nn.scan(Group, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=num_groups,
                          unroll=1 if cfg.scan_layers else num_groups,
                          metadata_params={nn.PARTITION_NAME: "layers"})  # stacked params gain a "layers" axis
        self.layers = scanned(cfg, kinds[:period])
        self.norm = RMSNorm(cfg.rms_norm_eps, param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(self, "lm_head", dense_init(cfg.initializer_range),
                                 (cfg.hidden_size, cfg.vocab_size), param_dtype, ("embed", "vocab"))
        if cfg.mtp_num_layers:
            self.mtp = MTP(cfg)
        if cfg.vision is not None:
            self.visual = VisionTower(cfg.vision, cfg.vision.out_hidden_size or cfg.hidden_size, dtypes(cfg)[0],
                                      param_dtype, cfg.initializer_range)

    def hidden(self, tokens_BT, segment_ids_BT, positions_BT, cache=None, cache_index=None, vision=None):
        dtype, _ = dtypes(self.cfg)
        h_BTD = self.embed_tokens(tokens_BT).astype(accum_dtype(dtype))
        if vision is not None:  # early fusion (qwen35_jax/multimodal.py)
            embeds = self.visual(*(vision[k] for k in VISION_KEYS))
            h_BTD = fuse_vision(h_BTD, tokens_BT, embeds, self.cfg.vision)
        h_BTD = constrain(h_BTD, ("batch", "seq", "embed"))
        h_BTD, (stats, cache) = self.layers(h_BTD, segment_ids_BT, positions_BT, cache, cache_index)
        if stats is not None:  # [groups, moe-per-group, ...] -> [moe layers, ...]
            stats = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
        return self.norm(h_BTD), stats, cache

    def logits(self, h_BTD):
        dtype, _ = dtypes(self.cfg)
        # tied: contract with the embedding's own D axis ([V, D]); a transposed view made XLA CPU copy the whole
        # table at every decode step. lax.dot_general, not jnp.dot: jnp.dot is a cached jit, so qwix's FP8
        # interception would leak across calls
        tied = self.cfg.tie_word_embeddings
        w = self.embed_tokens.embedding if tied else self.lm_head
        return constrain(head_logits(self.cfg, h_BTD, w, 1 if tied else 0), ("batch", "seq", "vocab"))

    def mtp_logits(self, h_BTD, next_tokens_BT, segment_ids_BT, positions_BT, cache=None, cache_index=None):
        """Logits for token t+2 at each position t (from h_t and token t+1), the MTP hidden state (fed back as h
        to draft further tokens), router stats, MTP cache."""
        u_BTD, stats, cache = self.mtp_hidden(h_BTD, next_tokens_BT, segment_ids_BT, positions_BT, cache, cache_index)
        return self.logits(u_BTD), u_BTD, stats, cache

    def mtp_hidden(self, h_BTD, next_tokens_BT, segment_ids_BT, positions_BT, cache=None, cache_index=None):
        """The MTP hidden state before the LM head, router stats, MTP cache (see `mtp_logits`)."""
        dtype, _ = dtypes(self.cfg)
        emb = constrain(self.embed_tokens(next_tokens_BT).astype(accum_dtype(dtype)), ("batch", "seq", "embed"))
        return self.mtp(emb, h_BTD, segment_ids_BT, positions_BT, cache, cache_index)

    def __call__(self, tokens_BT, segment_ids_BT, positions_BT, cache=None, cache_index=None, mtp_tokens_BT=None,
                 vision=None, logits=True):
        h_BTD, stats, cache = self.hidden(tokens_BT, segment_ids_BT, positions_BT, cache, cache_index, vision)
        aux = {"hidden": h_BTD, "router": stats}
        if cache is not None:
            aux["cache"] = cache
        if mtp_tokens_BT is not None and self.cfg.mtp_num_layers:
            u_BTD, aux["mtp_router"], _ = self.mtp_hidden(h_BTD, mtp_tokens_BT, segment_ids_BT, positions_BT)
            if logits:
                aux["mtp_logits"] = self.logits(u_BTD)
            else:
                aux["mtp_hidden"] = u_BTD
        return (self.logits(h_BTD) if logits else h_BTD), aux


@functools.lru_cache(maxsize=64)
def module_for(cfg: ModelConfig, fp8=None) -> Qwen35:
    """The model module; with an FP8 recipe (precision.Fp8Config) its listed matmuls run in FP8 through qwix."""
    return quantize_module(Qwen35(cfg), fp8)


@functools.lru_cache(maxsize=64)
def jitted_apply(cfg: ModelConfig, fp8=None, logits: bool = True):
    return jax.jit(functools.partial(module_for(cfg, fp8).apply, logits=logits))


def lm_head(cfg: ModelConfig, params, h_BTD, fp8=None):
    """The LM head as `forward` applies it: final-normed hidden states [..., D] -> fp32 logits [..., V] (the tied
    embedding or `lm_head`, the compute dtype, FP8 under a recipe that quantizes it)."""
    return module_for(cfg, fp8).apply({"params": params}, h_BTD, method=Qwen35.logits)


def default_inputs(tokens_BT, segment_ids_BT=None, positions_BT=None, start=0):
    """Segment ids default to one document per row (1s); positions to start..start+T-1 (start: a cache index)."""
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    return jnp.asarray(segment_ids_BT, jnp.int32), jnp.asarray(positions_BT, jnp.int32)


def check_tokens(cfg: ModelConfig, tokens_BT) -> None:
    """Concrete token arrays are range-checked (traced ones cannot be)."""
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    tokens = jnp.asarray(tokens_BT)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) (vocab_size of {cfg.name!r}), "
                             f"got min {lo}, max {hi}")


def _boxed_init(cfg: ModelConfig, rng) -> dict:
    tokens = jnp.zeros((1, 8), jnp.int32)
    seg, pos = default_inputs(tokens)
    vision = dummy_vision(cfg.vision) if cfg.vision is not None else None
    variables = module_for(cfg).init(rng, tokens, seg, pos, mtp_tokens_BT=tokens if cfg.mtp_num_layers else None,
                                     vision=vision)
    return variables["params"]


@functools.lru_cache(maxsize=64)
def _jitted_init(cfg: ModelConfig):
    return jax.jit(lambda rng: nn.meta.unbox(_boxed_init(cfg, rng)))


def init_params(cfg: ModelConfig, rng) -> dict:
    """Parameters as a plain nested dict of arrays (`param_dtype`), made by one compiled program (not op by op)."""
    return _jitted_init(cfg)(rng)


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameters as ShapeDtypeStructs inside their Flax `LogicallyPartitioned` boxes (the logical axes each
    layer declared), nothing allocated: what `sharding.param_shardings` / `logical_axes` read."""
    return jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))


def param_axes(cfg: ModelConfig) -> dict:
    """The declared logical axes of every parameter (`sharding.LogicalAxes` leaves, same tree as `init_params`);
    an undeclared parameter raises `sharding.UndeclaredParameterError`."""
    from qwen35_jax.sharding import logical_axes

    return logical_axes(abstract_params(cfg))


def forward(cfg: ModelConfig, params, tokens, *, segment_ids=None, positions=None, return_aux=False,
            mtp_tokens=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
            vision=None, fp8=None, logits=True):
    """Logits [B, T, V] in fp32 (and, with `return_aux`, {"hidden": [B, T, D], "router": stats or None}).

    With `logits=False` the LM head is not applied: the final-normed hidden states [B, T, D] take the logits' place
    (and "mtp_hidden" that of "mtp_logits"), for a loss that applies `lm_head` itself (in token chunks).

    `segment_ids [B, T]` numbers the documents packed in a row (0 marks padding: it is neither attended to nor fed to
    the recurrent layers); `positions [B, T]` are RoPE positions (default 0..T-1), or [3, B, T] mRoPE rows. With
    `mtp_tokens [B, T]` (token t+1 at position t, i.e. the targets) and an MTP head, aux also holds "mtp_logits"
    (predicting token t+2).

    Images and videos (a model with `vision`): `pixel_values [sum t*h*w, C*2*16*16]` and `image_grid_thw [n, 3]`
    as the Hugging Face processor gives them (likewise `pixel_values_videos`, `video_grid_thw`); their merged
    tokens replace the image (video) placeholder tokens and mRoPE positions follow `get_rope_index` unless
    `positions` are given. Grids must be concrete; inside jit pass `vision=` (multimodal.prepare_vision) instead.
    `fp8`: a precision.Fp8Config to run its matmuls in FP8 (training's `precision: fp8`), or None.
    """
    check_tokens(cfg, tokens)
    if pixel_values is not None or pixel_values_videos is not None or image_grid_thw is not None \
            or video_grid_thw is not None:
        vision, positions = prepare_vision(cfg, tokens, segment_ids=segment_ids, positions=positions,
                                           pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    apply = jitted_apply(cfg, fp8, logits)  # compiled once per shape, not run op by op (inlined inside an outer jit)
    seg, pos = default_inputs(tokens, segment_ids, positions)
    mtp = None if mtp_tokens is None else jnp.asarray(mtp_tokens, jnp.int32)
    out, aux = apply({"params": params}, jnp.asarray(tokens, jnp.int32), seg, pos, mtp_tokens_BT=mtp, vision=vision)
    return (out, aux) if return_aux else out


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Decode state: per layer a KV cache (attention) or conv window + fp32 delta-rule state (Gated DeltaNet),
    stacked like the parameters ([num_groups] leading axis per block of the period), plus the write index."""
    dtype = dtype or dtypes(cfg)[0]
    kinds = cfg.layer_kinds
    period = layer_period(kinds)
    groups = len(kinds) // period
    layers = {}
    for j, (mixer, _) in enumerate(kinds[:period]):
        one = MIXERS[mixer].init_cache(cfg, batch, max_len, dtype)
        layers[f"block_{j}"] = jax.tree.map(lambda x: jnp.broadcast_to(x, (groups,) + x.shape), one)
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def _logit_rows(h_BTD, logits_at):
    """The hidden rows the LM head runs on: all (None), the last ("last") or `logits_at [B, N]` indices into T."""
    if logits_at is None:
        return h_BTD
    if isinstance(logits_at, str):
        if logits_at != "last":
            raise ValueError(f"logits_at must be None, 'last' or [B, N] indices, got {logits_at!r}")
        return h_BTD[:, -1:]
    at = jnp.asarray(logits_at, jnp.int32)
    if at.ndim != 2 or at.shape[0] != h_BTD.shape[0]:
        raise ValueError(f"logits_at must be [B={h_BTD.shape[0]}, N] indices into T, got shape {tuple(at.shape)}")
    return jnp.take_along_axis(h_BTD, at[..., None], axis=1)


def _start(index):
    """Default positions start at the cache index: a scalar, or [B] per-row indices (batched speculation)."""
    return index[:, None] if jnp.ndim(index) else index


def forward_cached(cfg: ModelConfig, params, tokens, cache, *, segment_ids=None, positions=None, logits_at=None,
                   vision=None, head_DV=None):
    """Runs `tokens [B, T]` on top of `cache` (prefill when the cache is empty, decode otherwise).

    Returns (logits [B, N, V] fp32, hidden [B, T, D], new cache). The LM head runs only where asked: every position
    (`logits_at=None`, N = T), the last one (`"last"`, N = 1: a prefill never forms [B, T, V]) or `logits_at [B, N]`
    indices into T. Positions default to the cache index onwards; pass them for left-padded batches (padding
    carries segment id 0 and is never attended to). The cache index may be [B] (per-row write slots); a cache in the
    checkpointed layout (`checkpoint_cache`) returns the Gated DeltaNet state after every one of the T tokens.
    `vision` (a prompt with images: multimodal.prepare_vision) comes with [3, B, T] mRoPE positions.
    `head_DV [D, V]`: the LM head's weights as a [D, V] array (`head_columns`), used instead of the parameters'.
    """
    check_tokens(cfg, tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    index = cache["index"]
    seg, pos = default_inputs(tokens, segment_ids, positions, start=_start(index))

    last = isinstance(logits_at, str)
    if last:
        _logit_rows(tokens[..., None], logits_at)  # a bad string fails here, naming the argument
    logits, hidden, layers = _jitted_cached_forward(cfg, last)(params, tokens, seg, pos, cache["layers"], index,
                                                               vision, None if last else logits_at, head_DV)
    return logits, hidden, {"index": index + tokens.shape[1], "layers": layers}


def _cached_run(model, tokens, seg, pos, layers, index, vision, logits_at, head_DV):
    h_BTD, _, layers = model.hidden(tokens, seg, pos, layers, index, vision)
    rows = _logit_rows(h_BTD, logits_at)
    logits = model.logits(rows) if head_DV is None else head_logits(model.cfg, rows, head_DV, 0)
    return logits, h_BTD, layers


@functools.lru_cache(maxsize=64)
def _jitted_cached_forward(cfg: ModelConfig, last: bool):
    """forward_cached's program, compiled once per shape (inlined when called inside an outer jit)."""
    module = module_for(cfg)

    def run(params, tokens, seg, pos, layers, index, vision, logits_at, head_DV):
        return module.apply({"params": params}, tokens, seg, pos, layers, index, vision,
                            "last" if last else logits_at, head_DV, method=_cached_run)

    return jax.jit(run)


def checkpoint_cache(cache: dict) -> dict:
    """The checkpointed layout of a decode cache: every Gated DeltaNet leaf (conv window, state) gains a position
    axis of length 1 after the batch ([groups, B, 1, ...]); a forward on it returns that axis with one checkpoint
    per new token, and `select_checkpoint` brings it back to length 1. KV caches are unchanged (they roll back by
    index)."""
    layers = {name: jax.tree.map(lambda x: x[:, :, None], block) if "state" in block else block
              for name, block in cache["layers"].items()}
    return dict(cache, layers=layers)


def select_checkpoint(cache: dict, at_B) -> dict:
    """Keeps each row's Gated DeltaNet checkpoint at position `at_B [B]` (the last accepted token of a speculative
    verify pass), in the checkpointed layout (length-1 position axis). The index is left to the caller."""
    at_B = jnp.asarray(at_B, jnp.int32)

    def pick(x):  # x [groups, B, P, ...]
        idx = at_B.reshape((1, -1, 1) + (1,) * (x.ndim - 3))
        return jnp.take_along_axis(x, idx, axis=2)

    layers = {name: jax.tree.map(pick, block) if "state" in block else block
              for name, block in cache["layers"].items()}
    return dict(cache, layers=layers)


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """KV cache of the MTP head's attention layer, plus its write index."""
    if not cfg.mtp_num_layers:
        raise ValueError(f"model {cfg.name!r} has no MTP head (mtp_num_layers=0)")
    dtype = dtype or dtypes(cfg)[0]
    return {"index": jnp.zeros((), jnp.int32), "layer": MIXERS["attn"].init_cache(cfg, batch, max_len, dtype)}


def mtp_forward_cached(cfg: ModelConfig, params, hidden, next_tokens, cache, *, segment_ids=None, positions=None,
                       logits_at=None, head_VD=None):
    """The MTP head on top of its cache: position t takes the main model's hidden state h_t `hidden [B, T, D]` and
    token t+1 `next_tokens [B, T]`. Returns (logits for token t+2 [B, N, V] at the rows `logits_at` selects, as in
    `forward_cached`; MTP hidden [B, T, D]; new cache). `head_VD [V', D]` (`draft_head`: some rows of the LM head)
    replaces the LM head, so the logits are [B, N, V'] over those tokens only (a speculative draft vocabulary)."""
    next_tokens = jnp.asarray(next_tokens, jnp.int32)
    index = cache["index"]
    seg, pos = default_inputs(next_tokens, segment_ids, positions, start=_start(index))

    def run(model, hidden, next_tokens, seg, pos, layer, index):
        u_BTD, _, layer = model.mtp_hidden(hidden, next_tokens, seg, pos, layer, index)
        rows = _logit_rows(u_BTD, logits_at)
        logits = model.logits(rows) if head_VD is None else head_logits(cfg, rows, head_VD, 1)
        return logits, u_BTD, layer

    logits, u, layer = module_for(cfg).apply({"params": params}, hidden, next_tokens, seg, pos, cache["layer"],
                                             index, method=run)
    return logits, u, {"index": index + next_tokens.shape[1], "layer": layer}


def draft_head(cfg: ModelConfig, params, ids_V) -> jax.Array:
    """The rows of the LM head (the tied embedding or `lm_head`) for token ids `ids_V [V']`, as [V', D]: sliced
    once, so that a draft over V' tokens reads V' x D weights instead of V x D (`mtp_forward_cached(head_VD=...)`)."""
    ids = jnp.asarray(ids_V, jnp.int32)
    if ids.ndim != 1 or not 0 < ids.shape[0] <= cfg.vocab_size:
        raise ValueError(f"draft vocabulary must be 1-D with 1..{cfg.vocab_size} ids, got shape {tuple(ids.shape)}")
    if cfg.tie_word_embeddings:
        return jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)
    return jnp.take(params["lm_head"], ids, axis=1).T


def head_columns(cfg: ModelConfig, params) -> jax.Array:
    """The LM head as a [D, V] array: `lm_head` itself, or a transposed copy of the tied embedding. On XLA's CPU
    backend a few rows times [V, D] contracted on D (the tied layout) take a slow path, 2-3x one row's cost at
    2-4 rows, where [D, V] costs 1.3-2x (a speculative verify pass: `forward_cached(head_DV=...)`)."""
    if cfg.tie_word_embeddings:
        return jnp.transpose(params["embed_tokens"]["embedding"])  # a new [D, V] buffer
    return params["lm_head"]


def cache_bytes(cfg: ModelConfig, batch: int, context: int, dtype=None) -> dict:
    """Bytes of decode state for `batch` sequences of `context` tokens, from the shapes `init_cache` would allocate
    (nothing is allocated): {"kv_cache": attention KV caches (grow with context), "recurrent": conv windows and fp32
    delta-rule states (constant), "total"}."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype))
    out = {"kv_cache": 0, "recurrent": 0}
    for block in shapes["layers"].values():
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(block))
        out["kv_cache" if "k" in block else "recurrent"] += nbytes
    out["total"] = out["kv_cache"] + out["recurrent"]
    return out
