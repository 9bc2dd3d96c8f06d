"""BENCH_SMALL (../shared/docs/benchmarks.md): CPU training throughput of qwen35-jax against transformers.

Model `bench-small` (vocab 8192, hidden 256, 4 layers GGGA, 16 experts top-4), batch 4 x 512 tokens, fp32. Both sides
use the SAME weights (ours are exported with `hf.save` and loaded by `transformers` 5.23.0
`Qwen3_5MoeForCausalLM`, eager attention and its pure-torch Gated DeltaNet) and the same loss: mean next-token
cross-entropy plus `router_aux_loss_coef` x the load-balancing loss pooled over the MoE layers (`--no-aux-loss` drops
it on both sides). Measured, side by side and alternating step by step:

  (a) forward + backward: ours `jax.jit(jax.value_and_grad(loss))`; peer `loss.backward()` (torch, 2 threads);
  (b) a full training step with AdamW: ours `optax.adamw` (jit, parameters and state donated); peer
      `torch.optim.AdamW` (zero_grad, forward, backward, step).

Reported: medians of `--steps` timed steps after `--warmup` untimed ones, tokens/s, the ratio ours/peer (the median of
per-round ratios), and an MFU-style figure: `cfg.flops_per_token(512)` (training FLOPs per token) times tokens/s over
a measured fp32 matmul peak of this CPU (a large `jnp.dot`). `--profile` adds a per-component breakdown (GDN,
attention, MoE and its parts, LM head + loss), each component timed alone on both sides with the same inputs.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_small.py --steps 5 --out bench_small.json [--profile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import (add_load_arguments, environment, interleaved, load_guard, load_line,  # noqa: E402
                               machine_record, markdown_table, matmul_peak_gflops, paired_ratio, write_json)
from qwen35_jax import forward, hf, init_params, load_config  # noqa: E402
from qwen35_jax.model import head_logits, lm_head  # noqa: E402
from qwen35_jax.train.losses import head_loss_sums  # noqa: E402

GOAL = 1.5  # issue 14: train step and forward+backward tokens/s, ours over transformers, idle machine
ADAMW = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, wd=0.1)  # both sides' optimizer


def adamw(hp=ADAMW):
    return optax.adamw(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"])


# ---------------------------------------------------------------------------------------------------------------
# Ours


def make_loss(cfg, aux_loss: bool, loss_chunks: int = 1):
    """loss(params, tokens [B, T]) = mean CE of positions 0..T-2 predicting 1..T-1 (+ coef x load balancing),
    through the trainer's own path: the hidden states, then `losses.head_loss_sums` over shifted targets with the
    last position masked (in `loss_chunks` token slices), as `qwen35 train` computes it."""
    def loss_fn(params, tokens_BT):
        h_BTD, aux = forward(cfg, params, tokens_BT, return_aux=True, logits=False)
        B, T = tokens_BT.shape
        targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
        mask_BT = jnp.broadcast_to(jnp.arange(T) < T - 1, (B, T))
        ce_sum, _ = head_loss_sums(lambda x: lm_head(cfg, params, x), h_BTD, targets_BT, mask_BT, loss_chunks)
        loss = ce_sum / (B * (T - 1))
        if aux_loss and aux["router"] is not None:
            s = aux["router"]  # pooled over layers: sum numerators and denominators
            tokens = jnp.sum(s["tokens"])
            lb = cfg.num_experts * jnp.sum((jnp.sum(s["counts"], 0) / tokens) * (jnp.sum(s["probs"], 0) / tokens))
            loss = loss + cfg.router_aux_loss_coef * lb
        return loss
    return loss_fn


def train_step_fn(loss_fn, opt):
    """The jitted training step (params, opt_state, tokens) -> (params, opt_state, loss), parameters and state
    donated."""
    def train_step(p, s, t):
        loss, g = jax.value_and_grad(loss_fn)(p, t)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def ours_steps(cfg, params, tokens, aux_loss: bool, opt, loss_chunks: int = 1):
    """(fwd+bwd callable, train-step callable, first loss); the train step keeps its own donated state."""
    loss_fn = make_loss(cfg, aux_loss, loss_chunks)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    train_fn = train_step_fn(loss_fn, opt)
    state = {"params": jax.tree.map(jnp.copy, params)}
    state["opt"] = opt.init(state["params"])

    def train():
        state["params"], state["opt"], loss = train_fn(state["params"], state["opt"], tokens)
        return loss

    first_loss = float(grad_fn(params, tokens)[0])
    return (lambda: grad_fn(params, tokens)), train, first_loss


# ---------------------------------------------------------------------------------------------------------------
# Peer: transformers


def load_peer(cfg, params, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        hf.save(cfg, params, d)
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    if type(model).__name__ != "Qwen3_5MoeForCausalLM":
        raise RuntimeError(f"expected Qwen3_5MoeForCausalLM from the export, got {type(model).__name__}")
    return model.train()


def peer_steps(model, tokens_np, aux_loss: bool, lr, b1, b2, eps, wd):
    """(fwd+bwd callable, train-step callable, first loss) for the transformers model (its own AdamW state)."""
    import copy

    import torch

    ids = torch.from_numpy(tokens_np).long()
    train_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(train_model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)

    def loss_of(m):
        return m(input_ids=ids, labels=ids, output_router_logits=aux_loss, use_cache=False).loss

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        return None

    def train():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(train_model)
        loss.backward()
        opt.step()
        return None

    with torch.no_grad():
        first_loss = float(loss_of(model))
    return fwd_bwd, train, first_loss


# ---------------------------------------------------------------------------------------------------------------
# Per-component profile


def profile_components(cfg, params, tokens_np, peer, warmup: int, steps: int) -> list[dict]:
    """Each component alone, forward and forward+backward (w.r.t. its input and parameters), both sides.

    The peer's modules are called with the exact arguments the full model passes them (captured by forward
    pre-hooks); ours are the same Flax modules the model uses, applied to that layer's parameter slice.
    """
    import torch

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule
    from qwen35_jax.layers import MIXERS, MoE
    from qwen35_jax.layers.moe import dispatch_combine, route

    B, T = tokens_np.shape
    D = cfg.hidden_size
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((B, T, D), dtype=np.float32)
    cot_np = rng.standard_normal((B, T, D), dtype=np.float32)
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x, cot = jnp.asarray(x_np), jnp.asarray(cot_np)
    layer = lambda j, part: jax.tree.map(lambda a: a[0], params["layers"][f"block_{j}"][part])  # noqa: E731
    kinds = cfg.layer_kinds
    gdn_j = next(j for j, (m, _) in enumerate(kinds) if m == "gdn")
    attn_j = next(j for j, (m, _) in enumerate(kinds) if m == "attn")

    # Capture the peer modules' call arguments from one real forward.
    captured = {}
    hf_layers = peer.model.layers

    def capture(name):
        def hook(mod, args, kwargs):
            captured.setdefault(name, (args, kwargs))
        return hook

    handles = [hf_layers[gdn_j].linear_attn.register_forward_pre_hook(capture("gdn"), with_kwargs=True),
               hf_layers[attn_j].self_attn.register_forward_pre_hook(capture("attn"), with_kwargs=True),
               hf_layers[0].mlp.experts.register_forward_pre_hook(capture("experts"), with_kwargs=True)]
    with torch.no_grad():
        peer(input_ids=torch.from_numpy(tokens_np).long(), use_cache=False)
    for h in handles:
        h.remove()

    def torch_pair(module, make_args):
        """fwd and fwd+bwd callables for a torch module; make_args(x) gives (args, kwargs) for input x."""
        xt = torch.from_numpy(x_np)
        ct = torch.from_numpy(cot_np)

        def out_of(xin):
            args, kwargs = make_args(xin)
            y = module(*args, **kwargs)
            return y[0] if isinstance(y, tuple) else y

        def fwd():
            with torch.no_grad():
                out_of(xt)

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            xin = xt.clone().requires_grad_(True)
            y = out_of(xin)
            (y.reshape(ct.shape) * ct).sum().backward()

        return fwd, fwd_bwd

    def jax_pair(apply, p):
        """fwd and fwd+bwd (grads w.r.t. params and input) for apply(p, x) -> [B, T, D]-sized output."""
        f = jax.jit(apply)
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).reshape(cot.shape) * cot), argnums=(0, 1)))
        return (lambda: f(p, x)), (lambda: g(p, x))

    comps = []
    # Gated DeltaNet mixer (projections, conv, gates, delta rule, gated norm, output projection).
    gdn_mod = MIXERS["gdn"](cfg)
    comps.append(("GDN mixer", sum(m == "gdn" for m, _ in kinds),
                  jax_pair(lambda p, x: gdn_mod.apply({"params": p}, x, segment_ids_BT=seg, positions_BT=pos),
                           layer(gdn_j, "mixer")),
                  torch_pair(hf_layers[gdn_j].linear_attn,
                             lambda xin: ((), {**captured["gdn"][1], "hidden_states": xin}))))
    # The delta rule alone, at this layer's shapes (q/k l2norm inside, as the layer calls it).
    Hk, Hv, dk, dv = cfg.gdn_num_key_heads, cfg.gdn_num_value_heads, cfg.gdn_key_dim, cfg.gdn_value_dim
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import torch_chunk_gated_delta_rule
    q_np = rng.standard_normal((B, T, Hk, dk), dtype=np.float32)
    k_np = rng.standard_normal((B, T, Hk, dk), dtype=np.float32)
    v_np = x_np.reshape(B, T, Hv, dv) if Hv * dv == D else rng.standard_normal((B, T, Hv, dv), dtype=np.float32)
    g_np = -np.abs(rng.standard_normal((B, T, Hv), dtype=np.float32)) * 0.1
    beta_np = 1 / (1 + np.exp(-rng.standard_normal((B, T, Hv), dtype=np.float32)))
    qkv = tuple(jnp.asarray(a) for a in (q_np, k_np, g_np, beta_np))

    def gdr(p, vin):
        q, k, g, beta = p
        return chunk_gated_delta_rule(q, k, vin.reshape(B, T, Hv, dv), g, beta, use_qk_l2norm=True,
                                      chunk_size=cfg.gdn_chunk_size, impl=cfg.gdn_impl)[0]

    rep = Hv // Hk
    tq = torch.from_numpy(np.repeat(q_np, rep, axis=2))
    tk = torch.from_numpy(np.repeat(k_np, rep, axis=2))
    tg, tb = torch.from_numpy(g_np), torch.from_numpy(beta_np)
    params_t = [tq, tk, tg, tb]

    class _GDR(torch.nn.Module):
        def forward(self, vin):
            for t in params_t:
                t.requires_grad_(torch.is_grad_enabled())
            return torch_chunk_gated_delta_rule(tq, tk, vin.reshape(B, T, Hv, dv), tg, tb,
                                                chunk_size=cfg.gdn_chunk_size, use_qk_l2norm_in_kernel=True)[0]

    comps.append(("  delta rule (chunked)", sum(m == "gdn" for m, _ in kinds), jax_pair(gdr, qkv),
                  torch_pair(_GDR(), lambda xin: ((xin,), {}))))
    # Gated attention mixer.
    attn_mod = MIXERS["attn"](cfg)
    comps.append(("attention mixer", sum(m == "attn" for m, _ in kinds),
                  jax_pair(lambda p, x: attn_mod.apply({"params": p}, x, segment_ids_BT=seg, positions_BT=pos),
                           layer(attn_j, "mixer")),
                  torch_pair(hf_layers[attn_j].self_attn,
                             lambda xin: ((), {**captured["attn"][1], "hidden_states": xin}))))
    # MoE block (router, dispatch, experts, combine, shared expert).
    n_moe = sum(f == "moe" for _, f in kinds)
    if n_moe:
        moe_mod = MoE(cfg)
        mask = seg != 0
        comps.append(("MoE block", n_moe,
                      jax_pair(lambda p, x: moe_mod.apply({"params": p}, x, token_mask_BT=mask)[0], layer(0, "ffn")),
                      torch_pair(hf_layers[0].mlp, lambda xin: ((xin,), {}))))

        # Routed experts only: sorted dispatch + two grouped matmuls + combine (the router's choice is fixed).
        p_ffn = layer(0, "ffn")
        logits = x.reshape(-1, D) @ p_ffn["gate"]
        _, w_nk, e_nk = route(logits, cfg.experts_per_token, cfg.norm_topk_prob)

        def experts(p, xin):
            # the routing as a run-time value, as in the model (a closed-over constant lets XLA fold the index
            # arithmetic and the slots' layout choice at compile time)
            w, e = jax.lax.optimization_barrier((w_nk, e_nk))
            return dispatch_combine(xin.reshape(-1, D), w, e, p["gate_up_proj"], p["down_proj"], impl=cfg.moe_impl)

        t_idx, t_w = captured["experts"][0][1], captured["experts"][0][2]
        comps.append(("  routed experts (gmm)", n_moe,
                      jax_pair(experts, {"gate_up_proj": p_ffn["gate_up_proj"], "down_proj": p_ffn["down_proj"]}),
                      torch_pair(hf_layers[0].mlp.experts, lambda xin: ((xin.reshape(-1, D), t_idx, t_w), {}))))
    # LM head + cross-entropy (input: the final-normed hidden state), through the trainer's own head and loss.
    tok = jnp.asarray(tokens_np)
    tied = cfg.tie_word_embeddings
    w_head = params["embed_tokens"]["embedding"] if tied else params["lm_head"]
    head_mask = jnp.ones((B, T - 1), bool)

    def head_loss(w, h):
        ce_sum, _ = head_loss_sums(lambda x: head_logits(cfg, x, w, 1 if tied else 0), h[:, :-1], tok[:, 1:], head_mask)
        return ce_sum / head_mask.size * jnp.ones_like(h)

    ids = torch.from_numpy(tokens_np).long()

    class _Head(torch.nn.Module):
        def forward(self, h):
            logits = peer.lm_head(h)
            loss = peer.loss_function(logits, ids, peer.config.vocab_size)
            return loss * torch.ones_like(h)

    comps.append(("LM head + CE", 1, jax_pair(head_loss, w_head), torch_pair(_Head(), lambda xin: ((xin,), {}))))

    rows = []
    for name, count, (jf, jfb), (tf, tfb) in comps:
        r = interleaved({"jf": jf, "tf": tf}, warmup=warmup, steps=steps)
        rb = interleaved({"jfb": jfb, "tfb": tfb}, warmup=warmup, steps=steps)
        rows.append({"component": name, "count": count, "ours_fwd_ms": 1e3 * r["jf"]["median_s"],
                     "peer_fwd_ms": 1e3 * r["tf"]["median_s"], "ours_fwd_bwd_ms": 1e3 * rb["jfb"]["median_s"],
                     "peer_fwd_bwd_ms": 1e3 * rb["tfb"]["median_s"],
                     "fwd_bwd_speedup": paired_ratio(rb["jfb"], rb["tfb"])})
        print(f"profiled {name.strip()}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (the first compiles)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the peer")
    ap.add_argument("--no-aux-loss", dest="aux_loss", action="store_false",
                    help="cross-entropy only on both sides (default adds the router load-balancing loss)")
    ap.add_argument("--loss-chunks", type=int, default=1,
                    help="ours: the LM head and cross-entropy in this many token slices (the trainer's loss_chunks)")
    ap.add_argument("--no-train", dest="train", action="store_false", help="skip (b), the AdamW training step")
    ap.add_argument("--profile", action="store_true", help="also time each component alone on both sides")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the fp32 matmul that measures the peak")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    add_load_arguments(ap)
    args = ap.parse_args(argv)
    guard = load_guard(args)

    cfg = load_config(args.model)
    if cfg.dtype != "float32" or cfg.param_dtype != "float32":
        raise SystemExit(f"BENCH_SMALL is fp32; preset {args.model!r} has dtype {cfg.dtype}/{cfg.param_dtype}")
    B, T = args.batch, args.seq
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    tokens = jnp.asarray(tokens_np)
    params = init_params(cfg, jax.random.key(0))
    hp = ADAMW
    opt = adamw(hp)

    peak = matmul_peak_gflops(args.matmul_n)
    peak_gflops = peak["best_gflops"]  # the fastest of the runs: the least disturbed by other jobs
    print(f"fp32 matmul peak ({args.matmul_n}^3 jnp.dot): best {peak_gflops:.1f} GFLOP/s "
          f"(median {peak['gflops']:.1f})", flush=True)

    t0 = time.perf_counter()
    ours_fb, ours_train, ours_loss = ours_steps(cfg, params, tokens, args.aux_loss, opt, args.loss_chunks)
    print(f"ours: compiled forward+backward in {time.perf_counter() - t0:.1f}s, loss {ours_loss:.6f}", flush=True)
    peer = load_peer(cfg, params, args.threads)
    peer_fb, peer_train, peer_loss = peer_steps(peer, tokens_np, args.aux_loss, **hp)
    print(f"peer: loss {peer_loss:.6f} (|diff| {abs(peer_loss - ours_loss):.2e})", flush=True)

    tokens_per_step = B * T
    flops_per_token = cfg.flops_per_token(T)
    results = {}
    measures = [("forward+backward", ours_fb, peer_fb)]
    if args.train:
        measures.append(("train step (AdamW)", ours_train, peer_train))
    for name, ours_fn, peer_fn in measures:
        r = interleaved({"ours": ours_fn, "peer": peer_fn}, warmup=args.warmup, steps=args.steps)
        entry = {}
        for side in ("ours", "peer"):
            tps = tokens_per_step / r[side]["median_s"]
            entry[side] = {**r[side], "tokens_per_s": tps, "model_gflops": tps * flops_per_token / 1e9,
                           "mfu": tps * flops_per_token / (peak_gflops * 1e9)}
        entry["ratio"] = paired_ratio(r["ours"], r["peer"])
        entry["cpu_ratio"] = paired_ratio(r["ours"], r["peer"], key="cpu_s")
        results[name] = entry
        print(f"{name}: ours {entry['ours']['tokens_per_s']:.0f} tok/s, peer {entry['peer']['tokens_per_s']:.0f} "
              f"tok/s, ratio {entry['ratio']:.2f}", flush=True)

    profile = None
    if args.profile:
        profile = profile_components(cfg, params, tokens_np, peer, warmup=args.warmup, steps=args.steps)

    print()
    print(f"BENCH_SMALL: {args.model}, batch {B} x {T} tokens, fp32, loss = CE"
          f"{' + router aux' if args.aux_loss else ''}; peer transformers Qwen3_5MoeForCausalLM (eager), "
          f"torch {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up, interleaved")
    print()
    rows = []
    for name, e in results.items():
        rows.append([name, f"{1e3 * e['ours']['median_s']:.0f}", f"{1e3 * e['peer']['median_s']:.0f}",
                     f"{e['ours']['tokens_per_s']:.0f}", f"{e['peer']['tokens_per_s']:.0f}",
                     f"{e['ratio']:.2f}x", f"{e['cpu_ratio']:.2f}x", f"{e['ours']['model_gflops']:.1f}",
                     f"{100 * e['ours']['mfu']:.1f}%", f"{100 * e['peer']['mfu']:.1f}%",
                     f"{e['ours']['median_page_faults']:,.0f}", f"{e['peer']['median_page_faults']:,.0f}"])
    print(markdown_table(["measure", "ours ms", "peer ms", "ours tok/s", "peer tok/s", "ours/peer (wall)",
                          "ours/peer (CPU s)", "ours model GFLOP/s", "ours MFU", "peer MFU", "ours page faults",
                          "peer page faults"], rows))
    print(load_line(guard))
    print(f"\nMFU = flops_per_token({T}) = {flops_per_token / 1e6:.2f} MFLOP x tokens/s over the measured fp32 "
          f"matmul peak, {peak_gflops:.1f} GFLOP/s ({args.matmul_n}^3 jnp.dot, best of 7; median "
          f"{peak['gflops']:.1f}). 'CPU s' ratios use process CPU time per step, steadier on a shared machine.")
    for name, e in results.items():
        print(f"issue 14 goal: {name} >= {GOAL}x transformers: {e['ratio']:.2f}x "
              f"({'met' if e['ratio'] >= GOAL and not guard['loaded'] else 'NOT met'})")
    if profile:
        total = results["forward+backward"]["ours"]["median_s"] * 1e3
        total_p = results["forward+backward"]["peer"]["median_s"] * 1e3
        print(f"\nPer-component times (ms, one call, median; 'x n' = calls per step; share = n x fwd+bwd over the "
              f"full step's fwd+bwd: ours {total:.0f} ms, peer {total_p:.0f} ms)\n")
        prow = []
        for p in profile:
            top = not p["component"].startswith(" ")
            prow.append([p["component"].strip() if top else "↳ " + p["component"].strip(), p["count"],
                         p["ours_fwd_ms"], p["ours_fwd_bwd_ms"],
                         f"{100 * p['count'] * p['ours_fwd_bwd_ms'] / total:.0f}%",
                         p["peer_fwd_ms"], p["peer_fwd_bwd_ms"],
                         f"{100 * p['count'] * p['peer_fwd_bwd_ms'] / total_p:.0f}%",
                         f"{p['fwd_bwd_speedup']:.2f}x"])
        print(markdown_table(["component", "x n", "ours fwd", "ours fwd+bwd", "ours share", "peer fwd",
                              "peer fwd+bwd", "peer share", "fwd+bwd ours/peer"], prow))
    if args.out:
        write_json(args.out, {"benchmark": "bench_small", "model": args.model, "batch": B, "seq": T,
                              "steps": args.steps, "warmup": args.warmup, "aux_loss": args.aux_loss,
                              "optimizer": hp, "loss_ours": ours_loss, "loss_peer": peer_loss,
                              "flops_per_token": flops_per_token, "matmul_peak": peak, "results": results,
                              "profile": profile, "goal_ratio": GOAL, "loss_chunks": args.loss_chunks,
                              "environment": environment(),
                              "machine": machine_record(guard)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
