"""Decode speed: milliseconds per token at context 512 and 8192 (all-GDN and hybrid stacks), and MTP speculative
decoding on a trained run (acceptance rate and speed-up over plain greedy decoding).

(a) For each stack the prompt (random ids) is prefilled to the context length, then `--chunk`-step compiled decode
    chunks are timed (median of `--steps` chunks after a warm-up); ms/token = chunk time / chunk. The ratio
    ms(8192) / ms(512) shows how decode cost grows with context: constant-size recurrent state in GDN layers, a KV
    cache read that grows with context in attention layers.
(b) With `--run DIR` (default runs/default, the embedded default's trained run, when present): greedy generation of
    `--new-tokens` tokens after a few code prompts, plain and with MTP drafts (k = 1, 2, 3), reporting tokens/s,
    the speed-up, the acceptance rate and tokens per verify step. Greedy speculative output is checked equal to plain.
    The contenders alternate `--repeats` times; tokens/s and the speed-up are medians (the machine may be shared).
    `--skip-context` runs only this part.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/decode.py --out decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, markdown_table, write_json  # noqa: E402
from qwen35_jax import init_params, load_config  # noqa: E402
from qwen35_jax.generation import Sampling, _programs, generate  # noqa: E402
from qwen35_jax.model import init_cache  # noqa: E402

PROMPTS = ["def ", "class Parser:\n    def __init__(self", "import os\nimport sys\n\n", "    return self."]


def decode_ms_per_token(cfg, params, context: int, chunk: int, steps: int) -> float:
    prefill, decode_chunk = _programs(cfg, Sampling(), chunk)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context)).astype(np.int32)
    seg, pos = np.ones_like(tokens), np.arange(context, dtype=np.int32)[None]
    cache = init_cache(cfg, 1, context + chunk * (steps + 1))
    tok, _, _, cache = prefill(params, tokens, seg, pos, cache, jax.random.key(0))
    pos_B = jnp.asarray([context], jnp.int32)
    cache, tok, pos_B, _ = jax.block_until_ready(decode_chunk(params, cache, tok, pos_B, jax.random.key(1)))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        cache, tok, pos_B, out = jax.block_until_ready(decode_chunk(params, cache, tok, pos_B, jax.random.key(i)))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / chunk


def context_table(args) -> list[dict]:
    rows = []
    for name, pattern in (("all-GDN", "GGGG"), ("hybrid 3:1", "GGGA")):
        cfg = load_config(args.model, layer_pattern=pattern, dtype="float32", max_position_embeddings=65536)
        params = init_params(cfg, jax.random.key(0))
        ms = {c: decode_ms_per_token(cfg, params, c, args.chunk, args.steps) for c in args.contexts}
        row = {"stack": name, **{f"ms/token @{c}": round(v, 3) for c, v in ms.items()}}
        row[f"ratio {args.contexts[-1]}/{args.contexts[0]}"] = round(ms[args.contexts[-1]] / ms[args.contexts[0]], 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def mtp_table(args) -> list[dict]:
    """Plain greedy and MTP k = 1, 2, 3 on the same prompts, interleaved `--repeats` times (a burst of load from
    elsewhere slows every contender of that repeat); tokens/s and speed-up are medians over the repeats."""
    from qwen35_jax.generate_cli import load_source

    cfg, params, tokenizer = load_source(args.run)
    cfg = cfg.replace(dtype="float32")
    prompts = [list(tokenizer.encode(p)) for p in PROMPTS]
    ks = [0] + list(args.draft_tokens)
    spec = {k: dict(speculative="mtp", draft_tokens=k) if k else {} for k in ks}
    for k in ks:  # compile (every prompt fits one bucket: same shapes)
        generate(cfg, params, [prompts[0]], max_new_tokens=args.new_tokens, **spec[k])
    tps, runs = {k: [] for k in ks}, {}
    for _ in range(args.repeats):
        for k in ks:
            runs[k] = [generate(cfg, params, [p], max_new_tokens=args.new_tokens, **spec[k]) for p in prompts]
            tps[k].append(sum(r.stats["new_tokens"] - 1 for r in runs[k]) / sum(r.stats["decode_s"] for r in runs[k]))
    rows = []
    for k in ks:
        row = {"decoding": f"MTP k={k}" if k else "plain greedy", "tokens/s": round(statistics.median(tps[k]), 1),
               "speed-up": round(statistics.median(a / b for a, b in zip(tps[k], tps[0])), 2)}
        if k:
            if any(r.tokens != b.tokens for r, b in zip(runs[k], runs[0])):
                raise SystemExit(f"speculative greedy output differs from plain greedy at k={k}")
            rounds = sum(r.stats["rounds"] for r in runs[k])
            row["acceptance"] = round(sum(r.stats["acceptance_rate"] * r.stats["rounds"] for r in runs[k]) / rounds, 3)
            row["tokens/step"] = round(sum(r.stats["tokens_per_round"] * r.stats["rounds"] for r in runs[k]) / rounds,
                                       2)
        rows.append(row)
        print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    headers = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(headers, [[r.get(h, "") for h in headers] for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-context", action="store_true", help="only the MTP table")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = {"environment": environment()}
    if not args.skip_context:
        result["context"] = context_table(args)
        print(table(result["context"]))
    if Path(args.run, "checkpoints").exists():
        result["mtp"] = mtp_table(args)
        print(table(result["mtp"]))
    else:
        print(f"(no trained run at {args.run}: skipping the MTP table; run `make train` first)")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
