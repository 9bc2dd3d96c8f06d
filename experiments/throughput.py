"""Training throughput and compiled memory of one model against sequence length (forward + backward, no optimizer).

Memory is XLA's own account of the compiled program (`compiled.memory_analysis()`): arguments + outputs + temporaries
- aliased bytes. Backends that do not report it give None.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen35_jax.config import ModelConfig
from qwen35_jax.model import forward, init_params


def compiled_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))
    return int(total)


def profile_train_step(cfg: ModelConfig, seq_len: int, batch_size: int, *, repeats: int = 3, seed: int = 0) -> dict:
    """{"tokens_per_s": median over `repeats` timed calls after a warm-up, "memory_bytes": int or None,
    "compile_s": float} for value_and_grad of the next-token loss on random tokens [batch_size, seq_len]."""
    # Random weights of the right shapes: speed and memory do not depend on the values, and no init compile.
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, seq_len)), jnp.int32)

    def loss(p, tokens_BT):
        logits = forward(cfg, p, tokens_BT)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BT[:, 1:]).mean()

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": batch_size * seq_len / float(np.median(times)), "memory_bytes": compiled_bytes(compiled),
            "compile_s": compile_s}


__all__ = ["profile_train_step", "compiled_bytes"]
