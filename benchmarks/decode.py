"""Decode speed: milliseconds per token at context 512 and 8192 (all-GDN and hybrid stacks), and MTP speculative
decoding on a trained run (acceptance rate and speed-up over plain greedy decoding).

(a) For each stack the prompt (random ids) is prefilled to the context length, then `--chunk`-step compiled decode
    chunks are timed (median of `--steps` chunks after a warm-up); ms/token = chunk time / chunk. The ratio
    ms(8192) / ms(512) shows how decode cost grows with context: constant-size recurrent state in GDN layers, a KV
    cache read that grows with context in attention layers.
(b) With `--run DIR` (default runs/default, the embedded default's trained run, when present): greedy generation of
    `--new-tokens` tokens after a few code prompts, plain and with MTP drafts (k = 1, 2, 3; also drafting among the
    `--draft-vocab` most frequent tokens of the run's training data, as `qwen35 generate --draft-vocab` does),
    reporting tokens/s, the speed-up, the acceptance rate, acceptance per draft position (draft i accepted given
    drafts 1..i-1 were) and tokens per verify step. Greedy speculative output is checked equal to plain. For each
    prompt every contender runs in turn (rotating order), `--repeats` times; the speed-up is the median of the
    ratios to plain greedy on the same prompt in the same turn (the machine's speed drifts; neighbours cancel it).
    `--skip-context` runs only the speculative parts.
(c) The verify-cost and rollback ablation (the trained run's model, or `--model` when there is none): one compiled
    plain decode step against, for each k, the verify forward over k+1 tokens as before (final GDN states only)
    and after (checkpointed: the state after every position, the accepted one selected), the re-run of k+1
    tokens that the old rollback paid after every rejection, and the whole compiled round now (verify, acceptance,
    checkpoint selection, MTP head, next drafts). All in units of one plain step, interleaved medians.
(d) `--bandwidth`: the same verify cost on a model whose fp32 weights (a few hundred MB) do not fit in the caches,
    so that one decode step is dominated by reading the weights, as real models are on TPU/GPU.
(e) The verify and MTP pieces inside one compiled loop (32 calls per dispatch, so host dispatch is amortised as it is in
    generation): the main model's forward over 1, 2 and 4 tokens (checkpointed for 2 and 4; also with the [D, V]
    LM head the verify pass uses on CPU) and the MTP head over 1, 2 and 4 tokens with and without its LM head (and
    with the LM head over `--draft-vocab` rows), in units of the one-token forward.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/decode.py --out decode.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (add_load_arguments, environment, load_guard, load_line, machine_record,  # noqa: E402
                               markdown_table, write_json)
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
    """Plain greedy and MTP k = 1, 2, 3 (and with draft vocabularies) on the same prompts, every contender in turn
    for each prompt, `--repeats` times; tokens/s and the speed-up are medians over the (repeat, prompt) runs, the
    speed-up of the per-run ratios against plain greedy on the same prompt in the same turn."""
    from qwen35_jax.generate_cli import load_source

    cfg, params, tokenizer = load_source(args.run)
    cfg = cfg.replace(dtype="float32")
    prompts = [list(tokenizer.encode(p)) for p in PROMPTS]
    vocabs = {n: run_draft_vocab(args.run, tokenizer, cfg.vocab_size, n) for n in args.draft_vocab}
    # contenders: 0 (plain), k (MTP over the whole vocabulary), (k, n) (MTP drafting among the n most frequent)
    ks = [0] + list(args.draft_tokens) + [(k, n) for n in args.draft_vocab for k in args.draft_tokens]
    spec = {k: {} if k == 0 else dict(speculative="mtp", draft_tokens=k) if isinstance(k, int) else
            dict(speculative="mtp", draft_tokens=k[0], draft_vocab=vocabs[k[1]][0]) for k in ks}
    for k in ks:  # compile (every prompt fits one bucket: same shapes)
        generate(cfg, params, [prompts[0]], max_new_tokens=args.new_tokens, **spec[k])
    # per repeat and prompt, every contender in turn (the order rotating): a ratio compares runs a fraction of a
    # second apart, so the machine's speed (it drifts by up to 2x over minutes here) cancels
    tps = {k: [] for k in ks}
    runs = {k: [None] * len(prompts) for k in ks}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for rep in range(args.repeats):
        for j, p in enumerate(prompts):
            order = ks[(rep + j) % len(ks):] + ks[:(rep + j) % len(ks)]
            for k in order:
                runs[k][j] = generate(cfg, params, [p], max_new_tokens=args.new_tokens, **spec[k])
                tps[k].append((runs[k][j].stats["new_tokens"] - 1) / runs[k][j].stats["decode_s"])
    rows = []
    print(f"load average after: {os.getloadavg()}", flush=True)
    for k in ks:
        name = ("plain greedy" if k == 0 else f"MTP k={k}" if isinstance(k, int) else
                f"MTP k={k[0]}, draft vocab {k[1]} ({vocabs[k[1]][1]:.0%})")
        row = {"decoding": name, "tokens/s": round(statistics.median(tps[k]), 1),
               "speed-up": round(statistics.median(a / b for a, b in zip(tps[k], tps[0])), 2)}
        if k:
            if any(r.tokens != b.tokens for r, b in zip(runs[k], runs[0])):
                raise SystemExit(f"speculative greedy output differs from plain greedy at k={k}")
            rounds = sum(r.stats["rounds"] for r in runs[k])
            row["acceptance"] = round(sum(r.stats["acceptance_rate"] * r.stats["rounds"] for r in runs[k]) / rounds, 3)
            row["tokens/step"] = round(sum(r.stats["tokens_per_round"] * r.stats["rounds"] for r in runs[k]) / rounds,
                                       2)
            per_pos = np.mean([r.stats["acceptance_per_position"] for r in runs[k]], axis=0)  # prompts weigh equally
            row["acceptance per position"] = " / ".join(f"{x:.2f}" for x in per_pos)
        rows.append(row)
        print(row, flush=True)
    return rows


def run_draft_vocab(run_dir, tokenizer, vocab_size: int, size: int):
    """(ids, coverage): the `size` most frequent tokens of the run's training data, as `qwen35 generate
    --draft-vocab` picks them, and the share of the training tokens they cover."""
    from qwen35_jax import draft_vocab as dv

    ids, counts = dv.pick(dv.run_data_spec(run_dir), tokenizer, vocab_size, size)
    return ids, dv.coverage(counts, ids)


def spec_cost_table(cfg, params, ks, repeats: int) -> list[dict]:
    """(c) and (d): per k, costs in plain decode steps (see the module docstring); batch 1, interleaved medians."""
    from benchmarks.common import interleaved, paired_ratio
    from qwen35_jax.generation import _heads, _speculative_programs
    from qwen35_jax.model import checkpoint_cache, forward_cached, select_checkpoint

    rng = np.random.default_rng(0)
    P = 64
    prompt = rng.integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    cache = init_cache(cfg, 1, P + 16)
    _, _, cache = jax.jit(lambda p, t, c: forward_cached(cfg, p, t, c, logits_at="last"))(params, prompt, cache)
    step = jax.jit(lambda p, t, c: jnp.argmax(forward_cached(cfg, p, t, c)[0], -1))
    fns = {"step": lambda: step(params, prompt[:, :1], cache)}
    for k in ks:
        toks = prompt[:, :k + 1]

        @jax.jit
        def verify_before(p, t, c):  # final states only (the recurrent scan), the pre-checkpoint verify forward
            logits, _, c = forward_cached(cfg, p, t, c)
            return jnp.argmax(logits, -1), c

        @jax.jit
        def rerun(p, t, c):  # the old rollback: the accepted prefix again, rejected tail as padding
            keep = (jnp.arange(t.shape[1]) == 0).astype(jnp.int32)[None]
            return forward_cached(cfg, p, t, c, segment_ids=keep)[2]

        @jax.jit
        def verify_after(p, t, c):  # checkpointed: every position's state, one selected
            logits, _, c = forward_cached(cfg, p, t, checkpoint_cache(c))
            return jnp.argmax(logits, -1), select_checkpoint(c, jnp.zeros((1,), jnp.int32))

        fns[f"verify before k={k}"] = lambda t=toks, f=verify_before: f(params, t, cache)
        fns[f"re-run k={k}"] = lambda t=toks, f=rerun: f(params, t, cache)
        fns[f"verify after k={k}"] = lambda t=toks, f=verify_after: f(params, t, cache)
        if cfg.mtp_num_layers:
            from qwen35_jax.model import init_mtp_cache

            start, verify_round, _ = _speculative_programs(cfg, Sampling(), k)
            c, m = init_cache(cfg, 1, P + 16), init_mtp_cache(cfg, 1, P + 16)
            y, d, lq, c, m = start(params, prompt, np.ones_like(prompt), np.arange(P, dtype=np.int32)[None], c, m,
                                   jax.random.key(0))
            n = jnp.asarray([P], jnp.int32)
            heads = _heads(cfg, params)  # as generate passes them (the [D, V] verify head on CPU)
            fns[f"round after k={k}"] = lambda y=y, d=d, lq=lq, c=c, m=m, f=verify_round: f(
                params, c, m, y, d, lq, n, jax.random.key(1), heads)
    times = interleaved(fns, warmup=2, steps=repeats)
    rows = []
    for k in ks:
        cost = {name: paired_ratio(times["step"], times[f"{name} k={k}"]) for name in
                ("verify before", "re-run", "verify after", "round after") if f"{name} k={k}" in times}
        row = {"k": k, "step ms": round(1e3 * times["step"]["median_s"], 3),
               "verify before (steps)": round(cost["verify before"], 2),
               "re-run rollback (steps)": round(cost["re-run"], 2),
               "verify after, checkpointed (steps)": round(cost["verify after"], 2)}
        if "round after" in cost:
            row["whole round after (steps)"] = round(cost["round after"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def in_loop_cost_table(cfg, params, repeats: int, calls: int = 32, draft_vocab=()) -> list[dict]:
    """(e): per piece, the median over `repeats` of a compiled `calls`-iteration loop of it, per call (the MTP
    head's LM head also over `draft_vocab` sizes of rows)."""
    from benchmarks.common import interleaved
    from qwen35_jax.model import (checkpoint_cache, draft_head, forward_cached, head_columns, init_mtp_cache,
                                  mtp_forward_cached)

    P = 64
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, P)), jnp.int32)
    cache = init_cache(cfg, 1, P + 16)
    _, hidden, cache = jax.jit(lambda p, t, c: forward_cached(cfg, p, t, c))(params, prompt, cache)

    def looped(body, init, *args):  # each call feeds the next (no loop-invariant code motion)
        f = jax.jit(lambda *a: jax.lax.fori_loop(0, calls, lambda i, c: body(c, *a), init))
        return lambda: f(*args)

    def main(T, head_DV=None):
        def body(t, p, c, w):
            c = checkpoint_cache(c) if T > 1 else c
            return jnp.argmax(forward_cached(cfg, p, t, c, head_DV=w)[0], -1).astype(jnp.int32)
        return looped(body, prompt[:, :T], params, cache, head_DV)

    fns = {f"main model, {T} token(s)": main(T) for T in (1, 2, 4)}
    head_DV = head_columns(cfg, params)
    for T in (2, 4):
        fns[f"main model, {T} token(s), [D, V] LM head"] = main(T, head_DV)
    if cfg.mtp_num_layers:
        mcache = init_mtp_cache(cfg, 1, P + 16)
        _, _, mcache = jax.jit(lambda p, h, t, c: mtp_forward_cached(cfg, p, h, t, c, logits_at="last"))(
            params, hidden, prompt, mcache)
        for T in (1, 2, 4):
            def with_head(h, p, t, c):
                logits, u, _ = mtp_forward_cached(cfg, p, h, t, c, logits_at="last")
                return u + 0 * jnp.max(logits)

            def without_head(h, p, t, c):
                return mtp_forward_cached(cfg, p, h, t, c, logits_at="last")[1]

            fns[f"MTP head, {T} token(s), LM head at 1"] = looped(with_head, hidden[:, :T], params, prompt[:, :T],
                                                                  mcache)
            fns[f"MTP head, {T} token(s), no LM head"] = looped(without_head, hidden[:, :T], params, prompt[:, :T],
                                                                mcache)
        for n in draft_vocab:
            head_VD = draft_head(cfg, params, jnp.arange(n, dtype=jnp.int32))

            def with_draft_head(h, p, t, c, w):
                logits, u, _ = mtp_forward_cached(cfg, p, h, t, c, logits_at="last", head_VD=w)
                return u + 0 * jnp.max(logits)

            fns[f"MTP head, 1 token(s), LM head over {n} tokens"] = looped(
                with_draft_head, hidden[:, :1], params, prompt[:, :1], mcache, head_VD)
    times = interleaved(fns, warmup=2, steps=repeats)
    base = times["main model, 1 token(s)"]["median_s"]
    rows = [{"piece": name, "ms per call": round(1e3 * t["median_s"] / calls, 3),
             "steps": round(t["median_s"] / base, 2)} for name, t in times.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def bandwidth_cfg(args):
    """A dense hybrid large enough that a decode step reads more weights than the CPU caches hold."""
    return load_config("tiny", vocab_size=16000, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=2,
                       head_dim=128, gdn_num_key_heads=4, gdn_num_value_heads=8, gdn_key_dim=128, gdn_value_dim=128,
                       num_experts=0, intermediate_size=3072, tie_word_embeddings=False, mtp_num_layers=0,
                       dtype="float32", max_position_embeddings=4096)


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
    parser.add_argument("--draft-vocab", type=int, nargs="*", default=[1024],
                        help="also MTP drafting among this many most frequent tokens of the run's training data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-context", action="store_true", help="only the speculative tables")
    parser.add_argument("--skip-throughput", action="store_true", help="no plain-vs-MTP tokens/s table")
    parser.add_argument("--cost-repeats", type=int, default=15)
    parser.add_argument("--bandwidth", action="store_true", help="add the bandwidth-bound verify-cost case")
    parser.add_argument("--out", default=None)
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    guard = load_guard(args)
    result = {"environment": environment()}
    if not args.skip_context:
        result["context"] = context_table(args)
        print(table(result["context"]))
        print(load_line(guard))
    trained = Path(args.run, "checkpoints").exists()
    if trained and not args.skip_throughput:
        result["mtp"] = mtp_table(args)
        print(table(result["mtp"]))
        print(load_line(guard))
    elif not trained:
        print(f"(no trained run at {args.run}: skipping the MTP table; run `make train` first)")
    if trained:
        from qwen35_jax.generate_cli import load_source

        cfg, params, _ = load_source(args.run)
        cfg = cfg.replace(dtype="float32")
    else:
        cfg = load_config(args.model, dtype="float32")
        params = init_params(cfg, jax.random.key(0))
    print(f"verify cost ({cfg.name}), load average {os.getloadavg()}", flush=True)
    result["verify_cost"] = spec_cost_table(cfg, params, args.draft_tokens, args.cost_repeats)
    print(table(result["verify_cost"]))
    print(load_line(guard))
    print(f"in-loop costs ({cfg.name}), load average {os.getloadavg()}", flush=True)
    result["in_loop_cost"] = in_loop_cost_table(cfg, params, args.cost_repeats, draft_vocab=args.draft_vocab)
    print(table(result["in_loop_cost"]))
    print(load_line(guard))
    if args.bandwidth:
        cfg = bandwidth_cfg(args)
        params = init_params(cfg, jax.random.key(0))
        mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2 ** 20
        print(f"bandwidth-bound model: {mb:.0f} MiB of fp32 weights, load average {os.getloadavg()}", flush=True)
        result["bandwidth"] = {"weights_mib": round(mb), "rows": spec_cost_table(cfg, params, args.draft_tokens,
                                                                                 args.cost_repeats)}
        print(table(result["bandwidth"]["rows"]))
        print(load_line(guard))
    result["load_avg_end"] = os.getloadavg()
    result["machine"] = machine_record(guard)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
