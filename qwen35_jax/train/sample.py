"""A short text sample at the end of training: temperature sampling with a fixed-size buffer (one compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.model import forward


def sample_text(cfg, params, tokenizer, prompt: str, num_tokens: int, *, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0) -> str:
    ids = list(tokenizer.encode(prompt)) or [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
    total = len(ids) + num_tokens
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(ids)] = ids

    @jax.jit
    def next_token(buf, t, key):
        logits = forward(cfg, params, buf)[0, t - 1] / temperature
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    key = jax.random.key(seed)
    buf = jnp.asarray(buf)
    for t in range(len(ids), total):
        key, sub = jax.random.split(key)
        tok = next_token(buf, t, sub)
        buf = buf.at[0, t].set(tok)
        if tokenizer.eos_id is not None and int(tok) == tokenizer.eos_id:
            total = t + 1
            break
    return tokenizer.decode([int(x) for x in np.asarray(buf[0, :total])])
