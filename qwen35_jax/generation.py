"""Text generation: prefill, a compiled decode loop, and speculative decoding with MTP drafts.

Prefill runs the prompt through the chunked Gated DeltaNet path and fills the KV caches, conv windows and recurrent
states. Decoding runs `chunk` steps per compiled call (a `lax.scan` of single-token steps on the recurrent GDN
path), so the host only wakes up to stream text and check stop tokens between chunks.

Speculative decoding (`speculative="mtp"`, any batch): the MTP head drafts `draft_tokens` tokens, the main model
verifies them in one pass. Greedy output is identical to plain greedy; sampling uses the standard acceptance rule
(accept a draft with probability min(1, p/q), otherwise sample from the normalised residual max(p - q, 0)), so it
samples exactly from the main model's (filtered) distribution. No token runs twice: the verify pass keeps the Gated
DeltaNet state and conv window after every verified position (the checkpointed cache layout, `checkpoint_cache`),
rollback selects each row's checkpoint at its accepted position, and the KV caches (the main model's and the MTP
head's) roll back by per-row index. Rounds run on device like plain decoding's steps: up to `chunk` rounds per
compiled `lax.while_loop` with fixed shapes (k+1 verify positions; the accepted counts, per-row output write
indices and stop conditions are traced), so the host wakes up only to stream each chunk's tokens. Prefill (plain and
speculative) runs the LM head on the last prompt position only. With a draft vocabulary (`draft_vocab`, the most
frequent tokens of a corpus: FR-Spec) the MTP head's LM head reads only those rows of the embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.config import ModelConfig
from qwen35_jax.errors import UserError
from qwen35_jax.multimodal import prepare_vision
from qwen35_jax.model import (checkpoint_cache, draft_head, forward_cached, head_columns, init_cache,
                              init_mtp_cache, mtp_forward_cached, select_checkpoint)

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this (fewer prefill compiles)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, vocab_size: int) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise UserError(f"top_k must be in [0, {vocab_size}], got {self.top_k}")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stop token included when one was hit)
    stats: dict  # prefill_s, decode_s, new_tokens, tokens_per_s; with speculation also rounds, acceptance_rate


def filtered_log_probs(logits_BV, s: Sampling):
    """Log-probabilities after temperature, top-k and top-p (nucleus) filtering (temperature > 0)."""
    logits = logits_BV.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        keep = before < s.top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits_BV, key, s: Sampling):
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_log_probs(logits_BV, s), axis=-1).astype(jnp.int32)


def _check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        prompts = np.asarray(prompts).tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("prompts must be a non-empty list of token-id lists")
    if isinstance(prompts[0], (int, np.integer)):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty (generation needs at least one token)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size}) of "
                            f"{cfg.name!r}")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise UserError(f"prompt {i}: {len(p)} prompt + {max_new_tokens} new tokens exceed the model's context "
                            f"of {cfg.max_position_embeddings} (max_position_embeddings)")
        out.append(p)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return out


def _left_pad(prompts: list[list[int]], bucket: int):
    """tokens, segment ids (0 = padding) and positions (0.. per prompt) of left-padded prompts."""
    P = -(-max(map(len, prompts)) // bucket) * bucket
    B = len(prompts)
    tokens, seg, pos = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = p
        seg[b, P - len(p):] = 1
        pos[b, P - len(p):] = np.arange(len(p))
    return tokens, seg, pos


@functools.lru_cache(maxsize=16)
def _programs(cfg: ModelConfig, s: Sampling, chunk: int):
    """Jitted prefill and decode-chunk functions for one model config and sampling setting."""

    @jax.jit
    def prefill(params, tokens, seg, pos, cache, key, vision=None):
        logits, hidden, cache = forward_cached(cfg, params, tokens, cache, segment_ids=seg, positions=pos,
                                               vision=vision, logits_at="last")  # [B, 1, V]: never [B, T, V]
        return sample(logits[:, -1], key, s), logits, hidden, cache

    @jax.jit
    def decode_chunk(params, cache, token_B, pos_B, key):
        def step(carry, key):
            cache, token_B, pos_B = carry
            logits, _, cache = forward_cached(cfg, params, token_B[:, None], cache, positions=pos_B[:, None])
            nxt = sample(logits[:, 0], key, s)
            return (cache, nxt, pos_B + 1), nxt

        (cache, token_B, pos_B), toks = jax.lax.scan(step, (cache, token_B, pos_B), jax.random.split(key, chunk))
        return cache, token_B, pos_B, toks.T

    return prefill, decode_chunk


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             seed: int = 0, speculative: str | None = None, draft_tokens: int = 2,
             draft_vocab: Sequence[int] | None = None, chunk: int = 16,
             on_tokens: Callable[[list[list[int]]], None] | None = None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt (a list of token-id lists; batched, any lengths).

    `on_tokens(new_tokens_per_prompt)` is called as tokens become available (streaming). Rows stop at the first
    token in `stop_tokens`. `speculative="mtp"` drafts `draft_tokens` tokens per step with the MTP head (batched:
    rows accept different numbers of drafts); `draft_vocab` (token ids, e.g. the most frequent ones:
    `draft_vocab.frequent_ids`) restricts the drafts to those tokens, so that each draft's LM head reads only their
    rows (the output is the same: the main model verifies every draft). Stats with speculation: rounds,
    acceptance_rate, acceptance_per_position (draft i accepted given drafts 1..i-1 were), tokens_per_round (tokens
    per main-model verify step).
    `chunk` is the number of decode steps (speculative: draft-verify rounds) per compiled call.
    Images / videos (`pixel_values`, `image_grid_thw`, ... as in `forward`, in prompt order) fill the prompts'
    placeholder tokens; decoding continues the mRoPE positions after the largest prompt position.
    """
    s = Sampling(float(temperature), int(top_k), float(top_p))
    s.check(cfg.vocab_size)
    prompts = _check_prompts(cfg, prompts, max_new_tokens)
    if speculative not in (None, "mtp"):
        raise UserError(f"speculative must be None or 'mtp', got {speculative!r}")
    if draft_vocab is not None and not speculative:
        raise UserError("draft_vocab restricts speculative drafts: it needs speculative='mtp'")
    if speculative:
        if pixel_values is not None or pixel_values_videos is not None:
            raise UserError("speculative decoding does not take image or video inputs yet; use plain decoding")
        if not cfg.mtp_num_layers:
            raise UserError(f"model {cfg.name!r} has no MTP head (mtp_num_layers=0): cannot draft with MTP")
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        return _generate_speculative(cfg, params, prompts, max_new_tokens, s, tuple(stop_tokens), seed,
                                     draft_tokens, chunk, on_tokens, _heads(cfg, params, draft_vocab))
    stop = set(int(t) for t in stop_tokens)
    tokens, seg, pos = _left_pad(prompts, PROMPT_BUCKET)
    vision, next_pos = None, pos[:, -1] + 1
    if any(x is not None for x in (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)):
        vision, pos = prepare_vision(cfg, tokens, segment_ids=seg, pixel_values=pixel_values,
                                     image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                     video_grid_thw=video_grid_thw)
        next_pos = np.asarray(pos).max(axis=(0, 2)) + 1  # mRoPE: text resumes after the largest position
    B, P = tokens.shape
    steps = -(-(max_new_tokens - 1) // chunk) * chunk
    cache = init_cache(cfg, B, P + steps + 1)
    prefill, decode_chunk = _programs(cfg, s, chunk)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    first, _, _, cache = prefill(params, tokens, seg, pos, cache, sub, vision)
    first = np.asarray(first)
    prefill_s = time.perf_counter() - t0
    out = [[] for _ in range(B)]
    done = [False] * B

    def emit(cols: np.ndarray):
        new = [[] for _ in range(B)]
        for b in range(B):
            for t in cols[b]:
                if done[b] or len(out[b]) >= max_new_tokens:
                    break
                out[b].append(int(t))
                new[b].append(int(t))
                done[b] = int(t) in stop or len(out[b]) >= max_new_tokens
        if on_tokens is not None and any(new):
            on_tokens(new)

    emit(first[:, None])
    token_B, pos_B = jnp.asarray(first), jnp.asarray(next_pos)
    t0 = time.perf_counter()
    while not all(done):
        key, sub = jax.random.split(key)
        cache, token_B, pos_B, toks = decode_chunk(params, cache, token_B, pos_B, sub)
        emit(np.asarray(toks))
    decode_s = time.perf_counter() - t0
    new_tokens = sum(map(len, out))
    return GenerationResult(out, {"prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": new_tokens,
                                  "tokens_per_s": (new_tokens - B) / decode_s if decode_s > 0 else 0.0})


def _draw(logits_BV, key, s: Sampling):
    """A draft token per row and its draft log-probabilities [B, V] (greedy: [B, 0], the rule needs none)."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32), jnp.zeros(logits_BV.shape[:-1] + (0,), jnp.float32)
    logq = filtered_log_probs(logits_BV, s)
    return jax.random.categorical(key, logq, axis=-1).astype(jnp.int32), logq


def accept(logits_BKV, drafts_BK, logq_BKV, key, s: Sampling):
    """The acceptance rule over k drafts per row. `logits [B, k+1, V]`: the main model after the pending token and
    after each draft. Returns (accepted count a [B] in 0..k, the main model's token after the accepted prefix [B]).

    Greedy: the longest prefix of drafts equal to the main model's argmax, then its argmax. Sampling: draft i is
    accepted with probability min(1, p/q); the first rejected position samples the normalised residual
    max(p - q, 0), and when all k are accepted the bonus token samples p: exactly the main model's distribution.
    """
    k = drafts_BK.shape[1]
    if s.temperature == 0:
        target = jnp.argmax(logits_BKV, -1).astype(jnp.int32)  # [B, k+1]
        a = jnp.sum(jnp.cumprod((drafts_BK == target[:, :k]).astype(jnp.int32), axis=1), axis=1)
        return a, jnp.take_along_axis(target, a[:, None], 1)[:, 0]
    ku, kr = jax.random.split(key)
    logp = filtered_log_probs(logits_BKV, s)  # [B, k+1, V]
    p_d = jnp.take_along_axis(logp[:, :k], drafts_BK[..., None], 2)[..., 0]
    q_d = jnp.take_along_axis(logq_BKV, drafts_BK[..., None], 2)[..., 0]
    ok = jnp.log(jax.random.uniform(ku, drafts_BK.shape)) < p_d - q_d
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p = jnp.exp(logp)
    residual = jnp.concatenate([jnp.maximum(p[:, :k] - jnp.exp(logq_BKV), 0.0), p[:, k:]], 1)  # row k: bonus
    row = jnp.take_along_axis(residual, a[:, None, None], 1)[:, 0]
    p_a = jnp.take_along_axis(p, a[:, None, None], 1)[:, 0]
    row = jnp.where(jnp.sum(row, -1, keepdims=True) > 0, row, p_a)  # p == q exactly: nothing to correct
    return a, jax.random.categorical(kr, jnp.log(row), axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _speculative_programs(cfg: ModelConfig, s: Sampling, k: int, rounds: int = 16):
    """Jitted programs with `k` drafts per row (any batch): `start` (prefill of the main model and the MTP head,
    first drafts), `verify_round` (one draft-verify round) and `run_rounds` (up to `rounds` rounds in one compiled
    loop). Caches carry per-row write indices [B] and the main cache is in the checkpointed layout."""

    def draw(logits_BV, key, heads):
        """A draft per row from the MTP head's logits: over the whole vocabulary, or over the draft vocabulary
        (`heads["draft_ids"] [V']`; the log-probs are scattered back to [B, V], -inf off the subset)."""
        if "draft_ids" not in heads:
            return _draw(logits_BV, key, s)
        ids = heads["draft_ids"]
        j, logq = _draw(logits_BV, key, dataclasses.replace(s, top_k=min(s.top_k, ids.shape[0])))
        if logq.shape[-1]:
            logq = jnp.full(logq.shape[:-1] + (cfg.vocab_size,), -jnp.inf, logq.dtype).at[..., ids].set(logq)
        return ids[j], logq

    def draft_chain(params, u_BD, logits_BV, mtp_cache, p_B, key, heads):
        """Drafts d_1 from `logits` and d_2..d_k by feeding the MTP hidden state back at positions p, p+1.. (the
        chain's cache writes are scratch: the cache is not returned). Returns drafts [B, k], log-probs [B, k, V]."""
        keys = jax.random.split(key, k)
        d, logq = draw(logits_BV, keys[0], heads)
        if k == 1:
            return d[:, None], logq[:, None]

        def step(carry, key):
            u, d, cache, p = carry
            logits, u, cache = mtp_forward_cached(cfg, params, u, d[:, None], cache, positions=p[:, None],
                                                  head_VD=heads.get("draft_VD"))
            nd, lq = draw(logits[:, 0], key, heads)
            return (u, nd, cache, p + 1), (nd, lq)

        _, (ds, lqs) = jax.lax.scan(step, (u_BD[:, None], d, mtp_cache, p_B), keys[1:], unroll=True)
        return jnp.concatenate([d[:, None], ds.T], 1), jnp.concatenate([logq[:, None], jnp.moveaxis(lqs, 0, 1)], 1)

    @jax.jit
    def start(params, tokens, seg, pos, cache, mtp_cache, key, heads=None):
        """Prefill the main model and the MTP head (LM head on the last position only); returns the pending token
        y [B] (not yet in the main cache), drafts, their log-probs and the caches. `heads` (`_heads`, optional
        keys): "draft_ids" [V'] and "draft_VD" (their `draft_head` rows): the MTP head drafts among those tokens
        only; "verify_DV" (`head_columns`): the verify pass's LM head."""
        heads = heads or {}
        k1, k2 = jax.random.split(key)
        B, P = tokens.shape
        logits, hidden, cache = forward_cached(cfg, params, tokens, cache, segment_ids=seg, positions=pos,
                                               logits_at="last")
        y = sample(logits[:, 0], k1, s)
        nxt = jnp.concatenate([tokens[:, 1:], y[:, None]], axis=1)
        mlogits, u, mtp_cache = mtp_forward_cached(cfg, params, hidden, nxt, mtp_cache, segment_ids=seg,
                                                   positions=pos, logits_at="last", head_VD=heads.get("draft_VD"))
        per_row = jnp.full((B,), P, jnp.int32)
        cache = dict(checkpoint_cache(cache), index=per_row)
        mtp_cache = dict(mtp_cache, index=per_row)
        drafts, logq = draft_chain(params, u[:, -1], mlogits[:, 0], mtp_cache, pos[:, -1] + 1, k2, heads)
        return y, drafts, logq, cache, mtp_cache

    def verify_round(params, cache, mtp_cache, y, drafts, logq, n, key, heads=None):
        """Verify [y, d_1..d_k] at positions n..n+k [B] in one pass that keeps the Gated DeltaNet state after every
        position; roll back by selecting each row's checkpoint at its accepted position (KV caches: by index), so
        no token runs twice. Returns the tokens that follow each verified one [B, k+1] (the first a+1 are new:
        d_1..d_a and the main model's next token), a [B], the next pending token, next drafts and the caches."""
        heads = heads or {}
        kv, kd = jax.random.split(key)
        toks = jnp.concatenate([y[:, None], drafts], 1)  # [B, k+1]
        positions = n[:, None] + jnp.arange(k + 1, dtype=jnp.int32)
        index0, mtp_index0 = cache["index"], mtp_cache["index"]
        logits, hidden, verified = forward_cached(cfg, params, toks, cache, positions=positions,
                                                  head_DV=heads.get("verify_DV"))
        a, y_next = accept(logits, drafts, logq, kv, s)
        cache = dict(select_checkpoint(verified, a), index=index0 + a + 1)
        nxt = jnp.where(jnp.arange(k + 1) == a[:, None], y_next[:, None], jnp.concatenate([drafts, drafts[:, -1:]], 1))
        # the MTP head over the same k+1 positions (its KV slots past a are overwritten next round), LM head at a
        mlogits, u, mtp_cache = mtp_forward_cached(cfg, params, hidden, nxt, mtp_cache, positions=positions,
                                                   logits_at=a[:, None], head_VD=heads.get("draft_VD"))
        mtp_cache = dict(mtp_cache, index=mtp_index0 + a + 1)
        u_a = jnp.take_along_axis(u, a[:, None, None], 1)[:, 0]
        new_drafts, new_logq = draft_chain(params, u_a, mlogits[:, 0], mtp_cache, n + a + 1, kd, heads)
        return nxt, a, y_next, new_drafts, new_logq, cache, mtp_cache

    @jax.jit
    def run_rounds(params, state, stop_S, budget_B, done_B, heads=None):
        """Up to `rounds` rounds on device, ending early when every row is done (a stop token in `stop_S` (-1 pads)
        or `budget_B` new tokens; rows done before the call stay frozen). `state` = (cache, mtp_cache, pending y,
        drafts, logq, positions n of y, key). Returns the state, new tokens [B, rounds * (k+1)] (the first
        `count [B]` valid), count, done [B] and statistics: live rounds [B], accepted drafts [B], and per draft
        position i the rounds that reached it and that accepted it ([k] each)."""
        B = budget_B.shape[0]
        L = rounds * (k + 1)
        put = jax.vmap(lambda o, x, i: jax.lax.dynamic_update_slice(o, x, (i,)))

        def cond(c):
            return (c[2] < rounds) & ~jnp.all(c[4])

        def body(c):
            (cache, mtp_cache, y, drafts, logq, n, key), out_BL, r, count_B, done_B, st = c
            key, sub = jax.random.split(key)
            nxt, a, y2, drafts2, logq2, cache2, mtp2 = verify_round(params, cache, mtp_cache, y, drafts, logq, n, sub,
                                                                    heads)
            live = ~done_B
            # a finished row keeps its state: its caches, position and output stop moving
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda x, o: jnp.where(live.reshape((-1,) + (1,) * (x.ndim - 1)), x, o), new, old)
            cache = dict(cache2, index=jnp.where(live, cache2["index"], cache["index"]))
            mtp_cache = dict(mtp2, index=jnp.where(live, mtp2["index"], mtp_cache["index"]))
            y, drafts, logq = keep(y2, y), keep(drafts2, drafts), keep(logq2, logq)
            n = jnp.where(live, n + a + 1, n)
            # emit d_1..d_a and the next token, up to the first stop token and within the budget
            stop_at = jnp.any(nxt[..., None] == stop_S, -1) & (jnp.arange(k + 1) <= a[:, None])
            first_stop = jnp.where(jnp.any(stop_at, 1), jnp.argmax(stop_at, 1), k + 1)
            m = jnp.where(live, jnp.minimum(jnp.minimum(a, first_stop) + 1, budget_B - count_B), 0)
            out_BL = put(out_BL, nxt, jnp.minimum(count_B, L - (k + 1)))  # a live row has count <= L - (k+1)
            done_B = done_B | (live & ((first_stop < m) | (count_B + m >= budget_B)))
            pos_i = jnp.arange(1, k + 1)
            st = {"rounds": st["rounds"] + live, "accepted": st["accepted"] + jnp.where(live, a, 0),
                  "reached": st["reached"] + jnp.sum(live[:, None] & (a[:, None] >= pos_i - 1), 0),
                  "hits": st["hits"] + jnp.sum(live[:, None] & (a[:, None] >= pos_i), 0)}
            state = (cache, mtp_cache, y, drafts, logq, n, key)
            return state, out_BL, r + 1, count_B + m, done_B, st

        zB, zk = jnp.zeros((B,), jnp.int32), jnp.zeros((k,), jnp.int32)
        st = {"rounds": zB, "accepted": zB, "reached": zk, "hits": zk}
        init = (state, jnp.zeros((B, L), jnp.int32), jnp.zeros((), jnp.int32), zB, done_B, st)
        state, out_BL, _, count_B, done_B, st = jax.lax.while_loop(cond, body, init)
        return state, out_BL, count_B, done_B, st

    return start, jax.jit(verify_round), run_rounds


def _heads(cfg: ModelConfig, params, draft_vocab=None) -> dict:
    """The LM-head arrays the speculative programs take (made once per `generate` call): with a draft vocabulary
    (checked) its ids and `draft_head` rows; on XLA's CPU backend with a tied embedding, its [D, V] transpose for
    the verify pass (`head_columns`: [k+1, D] x [V, D] on D is a slow path there; an untied lm_head is [D, V])."""
    heads = {}
    if cfg.tie_word_embeddings and jax.default_backend() == "cpu":
        heads["verify_DV"] = head_columns(cfg, params)
    if draft_vocab is None:
        return heads
    ids = np.asarray(draft_vocab)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"draft_vocab must be a non-empty list of token ids, got shape {ids.shape} {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise UserError(f"draft_vocab: token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
    if np.unique(ids).size != ids.size:
        raise UserError("draft_vocab: token ids repeat")
    ids = jnp.asarray(ids, jnp.int32)
    return dict(heads, draft_ids=ids, draft_VD=draft_head(cfg, params, ids))


def _generate_speculative(cfg, params, prompts, max_new_tokens, s, stop_tokens, seed, k, rounds, on_tokens,
                          heads=None):
    stop = sorted(set(int(t) for t in stop_tokens))
    tokens, seg, pos = _left_pad(prompts, PROMPT_BUCKET)
    B, P = tokens.shape
    max_len = P + -(-max_new_tokens // PROMPT_BUCKET) * PROMPT_BUCKET + 2 * k + 2  # bucketed: fewer compiles
    cache, mtp_cache = init_cache(cfg, B, max_len), init_mtp_cache(cfg, B, max_len)
    start, _, run_rounds = _speculative_programs(cfg, s, k, rounds)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    y, drafts, logq, cache, mtp_cache = start(params, tokens, seg, pos, cache, mtp_cache, sub, heads)
    out = [[int(t)] for t in np.asarray(y)]  # the first token comes from the prefill; every round adds 1 to k+1
    prefill_s = time.perf_counter() - t0
    if on_tokens is not None:
        on_tokens([o[:] for o in out])
    stop_S = jnp.asarray(stop or [-1], jnp.int32)
    state = (cache, mtp_cache, y, drafts, logq, jnp.asarray(pos[:, -1] + 1), key)
    done = np.array([o[0] in stop or max_new_tokens == 1 for o in out])
    totals = {"rounds": 0, "accepted": 0, "reached": np.zeros(k, np.int64), "hits": np.zeros(k, np.int64)}
    t0 = time.perf_counter()
    while not done.all():
        budget = jnp.asarray([max_new_tokens - len(o) for o in out], jnp.int32)
        state, new, count, done_B, st = run_rounds(params, state, stop_S, budget, jnp.asarray(done), heads)
        new, count = np.asarray(new), np.asarray(count)
        chunks = [new[b, :count[b]].tolist() for b in range(B)]
        for o, c in zip(out, chunks):
            o += c
        done = np.asarray(done_B)
        for name in totals:  # rounds, accepted: per row; reached, hits: per draft position
            totals[name] = totals[name] + (np.asarray(st[name]).sum() if name in ("rounds", "accepted")
                                           else np.asarray(st[name]))
        if on_tokens is not None and any(chunks):
            on_tokens(chunks)
    decode_s = time.perf_counter() - t0
    new_tokens = sum(map(len, out))
    r = max(int(totals["rounds"]), 1)
    return GenerationResult(out, {
        "prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": new_tokens,
        "tokens_per_s": (new_tokens - B) / decode_s if decode_s > 0 else 0.0, "rounds": int(totals["rounds"]),
        "draft_tokens": k, "acceptance_rate": int(totals["accepted"]) / (r * k),
        "acceptance_per_position": (totals["hits"] / np.maximum(totals["reached"], 1)).tolist(),
        "tokens_per_round": (int(totals["accepted"]) + int(totals["rounds"])) / r})


__all__ = ["generate", "GenerationResult", "Sampling", "sample", "filtered_log_probs"]
