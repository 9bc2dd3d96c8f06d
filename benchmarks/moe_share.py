"""The MoE layers' share of the BENCH_SMALL training step (issue 4), on this machine.

Model `bench-small` (vocab 8192, hidden 256, 4 layers GGGA, every FFN a MoE of 16 experts top-4 plus a shared
expert), batch 4 x 512 tokens, fp32, loss = CE + router aux loss (as benchmarks/bench_small.py). Timed side by side,
alternating round by round (`interleaved`):

  - the AdamW train step and the loss's forward+backward (the whole model);
  - one MoE block alone, forward+backward w.r.t. its parameters and input (router, stats, dispatch, routed experts,
    combine, shared expert), on a random [4, 512, 256] input with the first layer's parameters;
  - its parts: the routed experts (sorted dispatch + two grouped matmuls + combine, routing fixed) and the router
    (logits, softmax, top-k, statistics).

A component's share is (calls per step x its median time) over the step's median time. Components timed alone miss
the fusion and overlap they get inside the whole step, so shares are estimates (their sum need not be 100%).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/moe_share.py --out benchmarks/results/moe_share.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.bench_small import ours_steps  # noqa: E402
from benchmarks.common import environment, interleaved, markdown_table, write_json  # noqa: E402
from qwen35_jax import init_params, load_config  # noqa: E402
from qwen35_jax.layers import MoE  # noqa: E402
from qwen35_jax.layers.moe import dispatch_combine, route, router_stats  # noqa: E402


def moe_components(cfg, params, B: int, T: int) -> dict:
    """name -> fwd+bwd callable of one layer's component (grads w.r.t. its parameters and input)."""
    D = cfg.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, D), dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal((B, T, D), dtype=np.float32))
    mask = jnp.ones((B, T), bool)
    p_ffn = jax.tree.map(lambda a: a[0], params["layers"]["block_0"]["ffn"])
    mod = MoE(cfg)

    def grad_of(apply, p):
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).reshape(cot.shape) * cot), argnums=(0, 1)))
        return lambda: g(p, x)

    _, w_nk, e_nk = route(x.reshape(-1, D) @ p_ffn["gate"], cfg.experts_per_token, cfg.norm_topk_prob)

    def experts(p, xin):
        return dispatch_combine(xin.reshape(-1, D), w_nk, e_nk, p["gate_up_proj"], p["down_proj"], impl=cfg.moe_impl)

    def router(w, xin):
        logits = xin.reshape(-1, D) @ w
        probs, weights, chosen = route(logits, cfg.experts_per_token, cfg.norm_topk_prob)
        stats = router_stats(logits, probs, chosen, mask.reshape(-1))
        # a scalar that depends on the weights and the statistics (both reach the loss in training)
        return (jnp.sum(weights) + jnp.sum(stats["counts"] * stats["probs"])) * jnp.ones_like(xin)

    return {
        "MoE block": grad_of(lambda p, xin: mod.apply({"params": p}, xin, token_mask_BT=mask)[0], p_ffn),
        "routed experts (dispatch + gmm + combine)": grad_of(
            experts, {"gate_up_proj": p_ffn["gate_up_proj"], "down_proj": p_ffn["down_proj"]}),
        "router + statistics": grad_of(router, p_ffn["gate"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (the first compiles)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    cfg = load_config(args.model)
    B, T = args.batch, args.seq
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T), dtype=np.int32))
    params = init_params(cfg, jax.random.key(0))
    opt = optax.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    t0 = time.perf_counter()
    fwd_bwd, train, loss = ours_steps(cfg, params, tokens, True, opt)
    print(f"compiled forward+backward in {time.perf_counter() - t0:.1f}s, loss {loss:.6f}", flush=True)
    n_moe = sum(f == "moe" for _, f in cfg.layer_kinds)
    comps = moe_components(cfg, params, B, T)
    fns = {"train step (AdamW)": train, "forward+backward (whole model)": fwd_bwd, **comps}
    r = interleaved(fns, warmup=args.warmup, steps=args.steps)

    step_ms = 1e3 * r["train step (AdamW)"]["median_s"]
    fb_ms = 1e3 * r["forward+backward (whole model)"]["median_s"]
    rows, entries = [], []
    for name, res in r.items():
        calls = n_moe if name in comps else 1
        ms = 1e3 * res["median_s"]
        entry = {"component": name, "calls_per_step": calls, "median_ms": ms, "per_step_ms": calls * ms,
                 "share_of_fwd_bwd": calls * ms / fb_ms, "share_of_train_step": calls * ms / step_ms,
                 "times_s": res["times_s"], "median_cpu_s": res["median_cpu_s"]}
        entries.append(entry)
        rows.append([name, calls, f"{ms:.0f}", f"{calls * ms:.0f}", f"{100 * entry['share_of_fwd_bwd']:.0f}%",
                     f"{100 * entry['share_of_train_step']:.0f}%"])
    print(f"\n{args.model}: batch {B} x {T}, fp32, {n_moe} MoE layers ({cfg.num_experts} experts top-"
          f"{cfg.experts_per_token}, shared expert {cfg.shared_expert_intermediate_size}); fwd+bwd per component; "
          f"median of {args.steps} interleaved rounds after {args.warmup} warm-up\n")
    print(markdown_table(["component", "calls/step", "ms per call", "ms per step", "share of fwd+bwd",
                          "share of train step"], rows))
    if args.out:
        write_json(args.out, {"benchmark": "moe_share", "model": args.model, "batch": B, "seq": T,
                              "steps": args.steps, "warmup": args.warmup, "moe_layers": n_moe, "loss": loss,
                              "results": entries, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
