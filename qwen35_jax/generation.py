"""Text generation: prefill, a compiled decode loop, and speculative decoding with MTP drafts.

Prefill runs the prompt through the chunked Gated DeltaNet path and fills the KV caches, conv windows and recurrent
states. Decoding runs `chunk` steps per compiled call (a `lax.scan` of single-token steps on the recurrent GDN
path), so the host only wakes up to stream text and check stop tokens between chunks.

Speculative decoding (`speculative="mtp"`, batch 1): the MTP head drafts `draft_tokens` tokens, the main model
verifies them in one pass. Greedy output is identical to plain greedy; sampling uses the standard acceptance rule
(accept a draft with probability min(1, p/q), otherwise sample from the normalised residual max(p - q, 0)), so it
samples exactly from the main model's (filtered) distribution. A rejected suffix is rolled back by re-running the
accepted prefix from the pre-verify cache with the rejected positions marked as padding (the GDN state and conv
window skip padding; the KV caches never attend to it). Rounds run on device like plain decoding's steps: up to
`chunk` rounds per compiled `lax.while_loop` with fixed shapes (k+1 verify positions; the accepted count, the
output write index and the stop condition are traced), so the host wakes up only to stream each chunk's tokens.
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
from qwen35_jax.model import forward_cached, init_cache, init_mtp_cache, mtp_forward_cached

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
                                               vision=vision)
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
             seed: int = 0, speculative: str | None = None, draft_tokens: int = 2, chunk: int = 16,
             on_tokens: Callable[[list[list[int]]], None] | None = None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt (a list of token-id lists; batched, any lengths).

    `on_tokens(new_tokens_per_prompt)` is called as tokens become available (streaming). Rows stop at the first
    token in `stop_tokens`. `speculative="mtp"` drafts `draft_tokens` tokens per step with the MTP head (batch 1).
    `chunk` is the number of decode steps (speculative: draft-verify rounds) per compiled call.
    Images / videos (`pixel_values`, `image_grid_thw`, ... as in `forward`, in prompt order) fill the prompts'
    placeholder tokens; decoding continues the mRoPE positions after the largest prompt position.
    """
    s = Sampling(float(temperature), int(top_k), float(top_p))
    s.check(cfg.vocab_size)
    prompts = _check_prompts(cfg, prompts, max_new_tokens)
    if speculative not in (None, "mtp"):
        raise UserError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative:
        if pixel_values is not None or pixel_values_videos is not None:
            raise UserError("speculative decoding does not take image or video inputs yet; use plain decoding")
        if len(prompts) != 1:
            raise UserError(f"speculative decoding runs one prompt at a time, got {len(prompts)}")
        if not cfg.mtp_num_layers:
            raise UserError(f"model {cfg.name!r} has no MTP head (mtp_num_layers=0): cannot draft with MTP")
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        return _generate_speculative(cfg, params, prompts[0], max_new_tokens, s, tuple(stop_tokens), seed,
                                     draft_tokens, chunk, on_tokens)
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


@functools.lru_cache(maxsize=16)
def _speculative_programs(cfg: ModelConfig, s: Sampling, k: int, rounds: int = 16):
    """Jitted programs for batch 1 with `k` drafts: `start` (prefill of the main model and the MTP head, first
    drafts), `round_` (one draft-verify round) and `run_rounds` (up to `rounds` rounds in one compiled loop)."""

    def draft_chain(params, u_1D, last_logits_1V, mtp_cache, pos, key):
        """Drafts d_1 from `last_logits` and d_2..d_k by feeding the MTP hidden state back at positions pos, pos+1..
        (cache slots beyond the committed index are scratch). Returns drafts [k] and their draft log-probs [k, V]."""
        def draw(logits, key):
            if s.temperature == 0:
                return jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.log_softmax(logits, -1)
            logq = filtered_log_probs(logits, s)
            return jax.random.categorical(key, logq).astype(jnp.int32), logq

        keys = jax.random.split(key, k)
        d, logq = draw(last_logits_1V[0], keys[0])

        def step(carry, key):
            u, d, cache, p = carry
            logits, u, cache = mtp_forward_cached(cfg, params, u, d[None, None], cache,
                                                  positions=jnp.full((1, 1), p, jnp.int32))
            nd, lq = draw(logits[0, 0], key)
            return (u, nd, cache, p + 1), (nd, lq)

        if k == 1:
            return d[None], logq[None]
        _, (ds, lqs) = jax.lax.scan(step, (u_1D[:, None], d, mtp_cache, pos), keys[1:])
        return jnp.concatenate([d[None], ds]), jnp.concatenate([logq[None], lqs])

    @jax.jit
    def start(params, tokens, seg, pos, cache, mtp_cache, key):
        """Prefill the main model and the MTP head; returns the pending token, drafts and caches."""
        k1, k2 = jax.random.split(key)
        logits, hidden, cache = forward_cached(cfg, params, tokens, cache, segment_ids=seg, positions=pos)
        y = sample(logits[:, -1], k1, s)  # the first new token (pending: not yet in the main cache)
        nxt = jnp.concatenate([tokens[:, 1:], y[:, None]], axis=1)
        mlogits, u, mtp_cache = mtp_forward_cached(cfg, params, hidden, nxt, mtp_cache, segment_ids=seg,
                                                   positions=pos)
        n = pos[0, -1] + 1  # committed length (the pending token's position)
        drafts, logq = draft_chain(params, u[:, -1], mlogits[:, -1], mtp_cache, n, k2)
        return y[0], drafts, logq, cache, mtp_cache

    def verify(params, cache, mtp_cache, y, drafts, logq, n, key):
        """Verify [y, d_1..d_k] at positions n..n+k. Returns the tokens that follow each verified one [k+1] (the
        first a+1 are new: d_1..d_a and the main model's next token), a, the next pending token, the next drafts
        and caches (rolled back to position n+a)."""
        kv, kr, kd = jax.random.split(key, 3)
        toks = jnp.concatenate([y[None], drafts])[None]  # [1, k+1]
        positions = (n + jnp.arange(k + 1, dtype=jnp.int32))[None]
        index0 = cache["index"]
        logits, hidden, verified = forward_cached(cfg, params, toks, cache, positions=positions)
        logits = logits[0]  # [k+1, V]: row i predicts the token after toks[i]
        if s.temperature == 0:
            target = jnp.argmax(logits, -1).astype(jnp.int32)
            ok = drafts == target[:k]
            a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
            y_next = target[a]
        else:
            logp = filtered_log_probs(logits, s)  # [k+1, V]
            p_d = jnp.take_along_axis(logp[:k], drafts[:, None], 1)[:, 0]
            q_d = jnp.take_along_axis(logq, drafts[:, None], 1)[:, 0]
            u = jax.random.uniform(kv, (k,))
            ok = jnp.log(u) < p_d - q_d
            a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
            residual = jnp.maximum(jnp.exp(logp[:k]) - jnp.exp(logq), 0.0)  # [k, V]
            residual = jnp.concatenate([residual, jnp.exp(logp[k:])], 0)  # row k: the bonus draws from p
            row = residual[a]
            row = jnp.where(jnp.sum(row) > 0, row, jnp.exp(logp[a]))  # p == q exactly: nothing to correct
            y_next = jax.random.categorical(kr, jnp.log(row / jnp.sum(row))).astype(jnp.int32)
        keep = (jnp.arange(k + 1) <= a).astype(jnp.int32)[None]

        def rerun(_):  # roll back: re-run the accepted prefix from the pre-verify cache, rejected tail as padding
            _, _, c = forward_cached(cfg, params, toks, cache, segment_ids=keep, positions=positions)
            return c

        new_cache = jax.lax.cond(a == k, lambda _: verified, rerun, None)
        new_cache = dict(new_cache, index=index0 + a + 1)
        nxt = jnp.where(jnp.arange(k + 1) == a, y_next, jnp.concatenate([drafts, drafts[-1:]]))
        mtp_index0 = mtp_cache["index"]
        mlogits, u, mtp_cache = mtp_forward_cached(cfg, params, hidden, nxt[None], mtp_cache, segment_ids=keep,
                                                   positions=positions)
        mtp_cache = dict(mtp_cache, index=mtp_index0 + a + 1)
        new_drafts, new_logq = draft_chain(params, u[:, a], mlogits[:, a], mtp_cache, n + a + 1, kd)
        return nxt, a, y_next, new_drafts, new_logq, new_cache, mtp_cache

    @jax.jit
    def run_rounds(params, state, stop_S, budget):
        """Up to `rounds` rounds on device, ending early after a stop token in `stop_S` (-1 pads) or `budget` new
        tokens. `state` = (cache, mtp_cache, pending y, drafts, logq, position n of y, key). Returns the state, the
        new tokens [rounds * (k+1)] (the first `count` valid), count, rounds run, drafts accepted, done."""
        L = rounds * (k + 1)

        def cond(c):
            return (c[3] < rounds) & ~c[5]

        def body(c):
            (cache, mtp_cache, y, drafts, logq, n, key), out_L, count, r, accepted, _ = c
            key, sub = jax.random.split(key)
            nxt, a, y, drafts, logq, cache, mtp_cache = verify(params, cache, mtp_cache, y, drafts, logq, n, sub)
            # emit d_1..d_a and the next token, up to the first stop token and within the budget
            stop_at = jnp.any(nxt[:, None] == stop_S[None, :], axis=1) & (jnp.arange(k + 1) <= a)
            first_stop = jnp.where(jnp.any(stop_at), jnp.argmax(stop_at), k + 1)
            m = jnp.minimum(jnp.minimum(a, first_stop) + 1, budget - count)
            out_L = jax.lax.dynamic_update_slice(out_L, nxt, (count,))  # count <= L - (k+1) before the last round
            done = (first_stop < m) | (count + m >= budget)
            return (cache, mtp_cache, y, drafts, logq, n + a + 1, key), out_L, count + m, r + 1, accepted + a, done

        zero = jnp.zeros((), jnp.int32)
        init = (state, jnp.zeros((L,), jnp.int32), zero, zero, zero, jnp.zeros((), bool))
        return jax.lax.while_loop(cond, body, init)

    return start, jax.jit(verify), run_rounds


def _generate_speculative(cfg, params, prompt, max_new_tokens, s, stop_tokens, seed, k, rounds, on_tokens):
    stop = sorted(set(int(t) for t in stop_tokens))
    tokens, seg, pos = _left_pad([prompt], PROMPT_BUCKET)
    P = tokens.shape[1]
    max_len = P + -(-max_new_tokens // PROMPT_BUCKET) * PROMPT_BUCKET + 2 * k + 2  # bucketed: fewer compiles
    cache, mtp_cache = init_cache(cfg, 1, max_len), init_mtp_cache(cfg, 1, max_len)
    start, _, run_rounds = _speculative_programs(cfg, s, k, rounds)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    y, drafts, logq, cache, mtp_cache = start(params, tokens, seg, pos, cache, mtp_cache, sub)
    out = [int(y)]  # the first token comes from the prefill; every round adds 1 to k+1 more
    prefill_s = time.perf_counter() - t0
    if on_tokens is not None:
        on_tokens([out[:]])
    stop_S = jnp.asarray(stop or [-1], jnp.int32)
    state = (cache, mtp_cache, y, drafts, logq, jnp.int32(len(prompt)), key)
    done = out[0] in stop or max_new_tokens == 1
    total_rounds = accepted = 0
    t0 = time.perf_counter()
    while not done:
        state, new, count, r, acc, done = run_rounds(params, state, stop_S, jnp.int32(max_new_tokens - len(out)))
        new = np.asarray(new)[:int(count)].tolist()
        out += new
        total_rounds, accepted, done = total_rounds + int(r), accepted + int(acc), bool(done)
        if on_tokens is not None and new:
            on_tokens([new])
    decode_s = time.perf_counter() - t0
    return GenerationResult([out], {
        "prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": len(out),
        "tokens_per_s": (len(out) - 1) / decode_s if decode_s > 0 else 0.0, "rounds": total_rounds,
        "draft_tokens": k, "acceptance_rate": accepted / max(total_rounds * k, 1),
        "tokens_per_round": (accepted + total_rounds) / max(total_rounds, 1)})


__all__ = ["generate", "GenerationResult", "Sampling", "sample", "filtered_log_probs"]
