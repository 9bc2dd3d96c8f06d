"""A short text sample at the end of training, through the cached generation path (`qwen35_jax.generate`)."""

from __future__ import annotations

from qwen35_jax.generation import generate


def sample_text(cfg, params, tokenizer, prompt: str, num_tokens: int, *, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0) -> str:
    ids = list(tokenizer.encode(prompt)) or [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = generate(cfg, params, [ids], max_new_tokens=num_tokens, temperature=temperature,
                   top_k=min(top_k, cfg.vocab_size), stop_tokens=stop, seed=seed)
    return tokenizer.decode(ids + out.tokens[0])
