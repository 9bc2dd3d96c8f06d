"""Sparse MoE (Qwen3.5 / Qwen3-Next): fp32 softmax router, top-k (renormalised), dropless grouped-matmul experts,
and a shared SwiGLU expert scaled per token by a sigmoid gate.

Dispatch sorts the N*k (token, expert) assignments by expert and runs two grouped matmuls over the sorted rows, so
the cost per token is independent of the number of experts (no one-hot [N, E] dispatch tensors). On CPU and GPU,
while every expert's load fits 1.25x the balanced load, the rows sit in [E, S] expert slots instead and each grouped
matmul is one batched matmul (`slot_matmul`; the sorted layout when an expert is over). A handful of
tokens (decoding, a speculative verify pass: at most `FEW_ROWS_MAX` assignments) instead loops over the distinct
experts they route to: each of those experts' weights is read once and applied to all of the tokens, as a decode
step must read them, without the grouped matmul's work-item loop or a gathered copy per assignment. Router statistics
(assignment counts and probability sums per expert, token count, z-loss sum) are returned as sums, so the trainer
can pool them over layers and the global batch before forming the load-balancing loss. Routing runs on the sharded
global batch, so under a mesh these sums are global-batch sums; with an `expert` mesh axis the routed experts run
expert-parallel (moe_ep.py).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.gmm import gmm, gmm_fp8, resolve_impl, tgmm
from qwen35_jax.layers.common import accum_dtype, dense_init, dtypes, param
from qwen35_jax.layers.mlp import SwiGLU
from qwen35_jax.layers.moe_ep import ep_dispatch_combine
from qwen35_jax.sharding import expert_parallel_size, shard_experts, shard_kernel


def route(logits_NE, k: int, renormalize: bool):
    """Top-k routing: (probs [N, E] fp32, weights [N, k] fp32, experts [N, k] int32)."""
    probs_NE = jax.nn.softmax(logits_NE.astype(accum_dtype(logits_NE.dtype)), axis=-1)
    weights_NK, experts_NK = jax.lax.top_k(probs_NE, k)
    if renormalize:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    return probs_NE, weights_NK, experts_NK.astype(jnp.int32)


def router_stats(logits_NE, probs_NE, experts_NK, token_mask_N):
    """Sums over tokens (padding excluded) that pool exactly across layers and data shards."""
    E = probs_NE.shape[-1]
    mask = token_mask_N.astype(probs_NE.dtype)
    counts_E = jnp.zeros((E,), probs_NE.dtype).at[experts_NK.reshape(-1)].add(
        jnp.repeat(mask, experts_NK.shape[-1]))
    z_N = jax.nn.logsumexp(logits_NE.astype(probs_NE.dtype), axis=-1)
    return {"counts": counts_E, "probs": jnp.sum(probs_NE * mask[:, None], axis=0),
            "tokens": jnp.sum(mask), "z_sq": jnp.sum(jnp.square(z_N) * mask)}


FEW_ROWS_MAX = 64  # up to this many (token, expert) assignments the routed experts run as a loop over the distinct ones


def distinct_experts_swiglu(x_ND, weights_NK, experts_NK, w_gate_up_EDF2, w_down_EFD):
    """The routed experts for a few tokens: a loop over the distinct experts among the N*k assignments (at most
    min(E, N*k) iterations; the slots past the distinct count are skipped), each expert's weights sliced once and
    applied to all N tokens, scaled by the token's routing weight for that expert (0 where it does not route
    there). Reads every routed expert once however many of the tokens share it: 4 verify tokens of the tiny model
    touch about 11 of its 16 experts, where gathering weights per assignment copied 16. Differentiable (a scan of
    conds), same numbers as the sorted dispatch up to the order of the sum over experts."""
    N, k = experts_NK.shape
    E, F2 = w_gate_up_EDF2.shape[0], w_gate_up_EDF2.shape[-1]
    sorted_R = jnp.sort(experts_NK.reshape(-1))
    first_R = jnp.concatenate([jnp.ones((1,), bool), sorted_R[1:] != sorted_R[:-1]])
    distinct_S = jnp.sort(jnp.where(first_R, sorted_R, E))[:min(E, N * k)]  # distinct ids first, then E (unused)
    combine_NE = jnp.zeros((N, E), x_ND.dtype).at[jnp.arange(N)[:, None], experts_NK].add(
        weights_NK.astype(x_ND.dtype))

    def one_expert(y_ND, e):
        w_gu = jax.lax.dynamic_index_in_dim(w_gate_up_EDF2, e, 0, keepdims=False)
        w_d = jax.lax.dynamic_index_in_dim(w_down_EFD, e, 0, keepdims=False)
        h_NF2 = jnp.dot(x_ND, w_gu, preferred_element_type=x_ND.dtype)
        h_NF = jax.nn.silu(h_NF2[:, : F2 // 2]) * h_NF2[:, F2 // 2:]
        scale_N1 = jax.lax.dynamic_index_in_dim(combine_NE, e, 1, keepdims=True)
        return y_ND + scale_N1 * jnp.dot(h_NF, w_d, preferred_element_type=x_ND.dtype)

    def body(y_ND, e):
        return jax.lax.cond(e < E, one_expert, lambda y, _: y, y_ND, e), None

    return jax.lax.scan(body, jnp.zeros_like(x_ND), distinct_S)[0]


def expert_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """Rows each expert keeps per dispatch group (the rest are dropped): capacity_factor x the balanced load."""
    return int(max(1, round(capacity_factor * num_tokens * k / num_experts)))


@jax.custom_vjp
def take_rows(x_RD, idx_S, back):
    """Rows `x_RD[idx_S]`, where an index out of range (>= R) gives a zero row, for a move that places every row of
    x at known positions: `back` [R] (row r lands at position back[r] of the result, S where it is not taken) or
    [R, k] (row r lands k times, at back[r, j]: a token's copies for its k experts). A permutation and its inverse
    are the special case. The gradient is the gather `g_SD[back]` (summed over the k copies; zero for rows not
    taken), where autodiff of a gather by arbitrary indices is a scatter-add (XLA CPU runs those row by row)."""
    return jnp.take(x_RD, idx_S, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_RD, idx_S, back):
    return take_rows(x_RD, idx_S, back), back


def _take_rows_bwd(back, g_SD):
    g = jnp.take(g_SD, back.reshape(-1), axis=0, mode="fill", fill_value=0)
    if back.ndim == 2:
        g = jnp.sum(g.reshape(back.shape + g.shape[1:]), axis=1)
    return g, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)

PADDED_SLACK = 1.25  # expert slots per balanced load in the padded dispatch (CPU/GPU; see `padded_slots`)


def padded_slots(num_rows: int, num_experts: int, slack: float = PADDED_SLACK) -> int:
    """Slots per expert of the padded dispatch for `num_rows` assignments: `slack` x the balanced load, a multiple
    of 8; 0 (sorted dispatch only) for slack 0, where the slots hold fewer than all rows (the sorted layout uses the
    same buffers) or more than 1.5x slack x the rows (a few rows per expert: rounding up to 8 wastes most of the
    work there, and one expert over its slots is likely anyway)."""
    if slack <= 0:
        return 0
    slots = -(-math.ceil(slack * num_rows / num_experts) // 8) * 8
    return slots if num_rows <= num_experts * slots <= 1.5 * max(slack, 1.0) * num_rows else 0


def _slot_mm(fits, a_PK, w_EKN, group_sizes_E, impl, transpose=False):
    """Per-group `a @ w[g]` (`w[g]^T` if transpose) on P rows in either layout: expert slots ([E, P / E] rows,
    one batched matmul) if `fits`, else rows sorted by group (the grouped matmul; rows past the groups give 0)."""
    E = w_EKN.shape[0]
    spec = "esk,enk->esn" if transpose else "esk,ekn->esn"

    def slots(a, w):  # accumulated in fp32 (or wider), as the grouped matmul does
        return jnp.einsum(spec, a.reshape(E, -1, a.shape[-1]), w, preferred_element_type=accum_dtype(a.dtype)
                          ).astype(a.dtype).reshape(a.shape[0], -1)

    def grouped(a, w):
        return gmm(a, w, group_sizes_E, transpose_rhs=transpose, impl=impl, preferred_element_type=a.dtype)

    return jax.lax.cond(fits, slots, grouped, a_PK, w_EKN)


def _slot_tmm(fits, a_PK, g_PN, group_sizes_E, impl):
    """Per-group `a_g^T g_g` [E, K, N] in the layout `_slot_mm` reads."""
    E = group_sizes_E.shape[0]

    def slots(a, g):
        return jnp.einsum("esk,esn->ekn", a.reshape(E, -1, a.shape[-1]), g.reshape(E, -1, g.shape[-1]),
                          preferred_element_type=accum_dtype(a.dtype)).astype(a.dtype)

    def grouped(a, g):
        return tgmm(a, g, group_sizes_E, num_groups=E, impl=impl, preferred_element_type=a.dtype)

    return jax.lax.cond(fits, slots, grouped, a_PK, g_PN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def slot_matmul(a_PK, w_EKN, group_sizes_E, fits, impl):
    """Grouped matmul of P rows in the layout `fits` selects (see `dispatch_combine`): [P, K] x [E, K, N] -> [P, N].
    Forward and backward each pick their layout by a `lax.cond` on `fits` that holds only the products (the
    residuals are the inputs), so choosing at run time costs no residual copies of both layouts."""
    return _slot_mm(fits, a_PK, w_EKN, group_sizes_E, impl)


def _slot_matmul_fwd(a_PK, w_EKN, group_sizes_E, fits, impl):
    return _slot_mm(fits, a_PK, w_EKN, group_sizes_E, impl), (a_PK, w_EKN, group_sizes_E, fits)


def _slot_matmul_bwd(impl, res, g_PN):
    a_PK, w_EKN, group_sizes_E, fits = res
    d_a = _slot_mm(fits, g_PN, w_EKN, group_sizes_E, impl, transpose=True)
    d_w = _slot_tmm(fits, a_PK, g_PN, group_sizes_E, impl).astype(w_EKN.dtype)
    return d_a, d_w, None, None


slot_matmul.defvjp(_slot_matmul_fwd, _slot_matmul_bwd)


def dispatch_combine(x_ND, weights_NK, experts_NK, w_gate_up_EDF2, w_down_EFD, *, impl="auto",
                     capacity_factor=0.0, fp8=None, slack=PADDED_SLACK):
    """Dropless (or capacity-limited) sorted dispatch through two grouped matmuls, combined with the weights.

    The N*k assignments (token n's j-th expert is assignment n*k + j) are sorted by expert with a permutation, and
    the expert outputs are put back in assignment order with its inverse: both moves and their gradients are row
    gathers (no scatter-add), and the routing weights apply in assignment order as one [N, k] x [N, k, D] sum.

    On CPU and GPU (impl "xla"), while no expert has more assignments than S = `padded_slots` (`slack` x the
    balanced load; slack 0 keeps the sorted dispatch only), the rows go instead to [E, S] expert slots (expert e's
    i-th row at slot e * S + i, the rest zero rows) and each grouped matmul is one batched matmul: 1.25x the FLOPs
    in large products, where the grouped matmul's loop of tile products runs at about half the speed of one
    (benchmarks/README.md, BENCH_SMALL). A step where one expert exceeds its slots runs the sorted layout in the
    same buffers (`slot_matmul`): same numbers either way, no token dropped."""
    N, D = x_ND.shape
    k = experts_NK.shape[-1]
    E = w_gate_up_EDF2.shape[0]
    R = N * k
    if fp8 is None and capacity_factor <= 0 and impl != "reference" and R <= FEW_ROWS_MAX:
        # faster for a decode or verify forward on CPU: benchmarks/moe_decode.py (numbers in benchmarks/README.md)
        return distinct_experts_swiglu(x_ND, weights_NK, experts_NK, w_gate_up_EDF2, w_down_EFD)
    flat_experts = experts_NK.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True).astype(jnp.int32)  # sorted row r holds assignment order[r]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(R, dtype=jnp.int32))
    group_sizes_E = jnp.bincount(flat_experts, length=E).astype(jnp.int32)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    if capacity_factor > 0:  # each expert keeps its first `capacity` rows in sorted (token) order
        capacity = expert_capacity(capacity_factor, N, k, E)
        rank = jnp.arange(R) - starts_E[flat_experts[order]]
        weights_NK = jnp.where((rank < capacity)[inverse].reshape(N, k), weights_NK, 0.0)
    S = padded_slots(R, E, slack)
    if S and fp8 is None and capacity_factor <= 0 and resolve_impl(impl) == "xla":
        fits = jnp.max(group_sizes_E) <= S
        slot_R = flat_experts * S + inverse - starts_E[flat_experts]  # assignment -> its expert slot
        rank_P = jnp.tile(jnp.arange(S, dtype=jnp.int32), E)
        expert_P = jnp.repeat(jnp.arange(E, dtype=jnp.int32), S)
        src_P = jnp.where(rank_P < group_sizes_E[expert_P],  # slot -> its assignment; R (a zero row) past the load
                          order[jnp.minimum(starts_E[expert_P] + rank_P, R - 1)], R)
        # not fitting: the sorted rows, then zero rows up to the E * S slots (src: row -> assignment, R for none;
        # back: assignment -> row)
        src, back = (jnp.where(fits, src_P, jnp.concatenate([order, jnp.full((E * S - R,), R, jnp.int32)])),
                     jnp.where(fits, slot_R, inverse))
    else:
        fits, src, back = None, order, inverse  # row r of the sorted layout holds assignment order[r]
    x_rows = take_rows(x_ND, src // k, back.reshape(N, k))
    y_rows = grouped_swiglu(x_rows, group_sizes_E, w_gate_up_EDF2, w_down_EFD, impl=impl, fp8=fp8, fits=fits)
    y_RD = take_rows(y_rows, back, src)
    return jnp.einsum("nk,nkd->nd", weights_NK.astype(y_RD.dtype), y_RD.reshape(N, k, D))


def in_token_chunks(fn, chunks: int):
    """`fn(x_ND, weights_NK, experts_NK, *weights) -> y_ND` on `chunks` token slices in turn (a `lax.map` whose body
    is rematerialised, so forward and backward hold one slice's dispatch rows). Slice i takes tokens i, i + chunks,
    ...: strided, so that under a mesh splitting the tokens every slice keeps every shard's share. Tokens are padded
    to a multiple of `chunks` with zero-weight rows."""
    if chunks <= 1:
        return fn

    def chunked(x_ND, weights_NK, experts_NK, *expert_weights):
        N = x_ND.shape[0]
        pad = -N % chunks
        if pad:
            x_ND, weights_NK, experts_NK = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x_ND, weights_NK, experts_NK))
        slices = lambda a: jnp.swapaxes(a.reshape(-1, chunks, a.shape[-1]), 0, 1)  # noqa: E731 [chunks, N/c, ...]
        body = jax.checkpoint(lambda a: fn(*a, *expert_weights), prevent_cse=False)  # lax.map is a scan
        y_CND = jax.lax.map(body, (slices(x_ND), slices(weights_NK), slices(experts_NK)))
        return jnp.swapaxes(y_CND, 0, 1).reshape(-1, y_CND.shape[-1])[:N]

    return chunked


def grouped_swiglu(x_MD, group_sizes_G, w_gate_up_GDF2, w_down_GFD, *, impl="auto", fp8=None, fits=None):
    """SwiGLU experts on rows sorted by group: [M, D] -> [M, D]; rows past sum(group_sizes) give zeros.
    fp8: keyword arguments of `gmm_fp8` (precision.py's recipe) to run both grouped matmuls in FP8, or None.
    fits: a traced bool for rows laid out by `dispatch_combine`'s expert slots: both products run as `slot_matmul`
    (the slot layout where it is true, the sorted one where not); None for rows sorted by group."""
    F2 = w_gate_up_GDF2.shape[-1]
    if fits is not None:
        def mm(a, w, group_sizes, **_):
            return slot_matmul(a, w, group_sizes, fits, impl)
    else:
        mm = gmm if fp8 is None else functools.partial(gmm_fp8, **fp8)
    h_MF2 = mm(x_MD, w_gate_up_GDF2, group_sizes_G, impl=impl, preferred_element_type=x_MD.dtype)
    h_MF = jax.nn.silu(h_MF2[:, : F2 // 2]) * h_MF2[:, F2 // 2:]
    return mm(h_MF, w_down_GFD, group_sizes_G, impl=impl, preferred_element_type=x_MD.dtype)


def expert_parallel_dispatch(cfg, fp8=None):
    """The per-shard routed-expert computation for `shard_experts` (which passes the tokens' shard, the local
    experts' weights and the axis name); a capacity factor applies per expert to each shard's tokens."""
    experts_fn = functools.partial(grouped_swiglu, impl=cfg.moe_impl, fp8=fp8)

    def local(x_ND, weights_NK, experts_NK, w_gate_up_LDF2, w_down_LFD, *, axis_name):
        capacity = None
        if cfg.capacity_factor > 0:
            capacity = expert_capacity(cfg.capacity_factor, x_ND.shape[0], cfg.experts_per_token, cfg.num_experts)
        return ep_dispatch_combine(x_ND, weights_NK, experts_NK, w_gate_up_LDF2, w_down_LFD, axis_name=axis_name,
                                   num_experts=cfg.num_experts, experts_fn=experts_fn, capacity=capacity)

    return local


def gmm_fp8_args():
    """`gmm_fp8` keyword arguments when the active qwix recipe quantizes this layer's experts, else None."""
    from qwen35_jax.precision import gmm_rule

    rule = gmm_rule()
    if rule is None:
        return None
    return {"fwd_dtype": rule.act_qtype, "bwd_dtype": rule.bwd_qtype, "channelwise": not rule.disable_channelwise_axes}


class MoE(nn.Module):
    """(y [B, T, D], router stats); the routed experts run expert-parallel when the active mesh splits them."""

    cfg: object

    @nn.compact
    def __call__(self, x_BTD, *, token_mask_BT):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        B, T, D = x_BTD.shape
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        init = dense_init(cfg.initializer_range)
        x_ND = x_BTD.reshape(B * T, D).astype(dtype)
        w_router_DE = param(self, "gate", init, (D, E), param_dtype, ("embed", None))  # small: replicated
        logits_NE = jnp.dot(x_ND, w_router_DE.astype(dtype), preferred_element_type=accum_dtype(dtype))
        probs_NE, weights_NK, experts_NK = route(logits_NE, cfg.experts_per_token, cfg.norm_topk_prob)
        stats = router_stats(logits_NE, probs_NE, experts_NK, token_mask_BT.reshape(-1))
        w_gate_up = param(self, "gate_up_proj", init, (E, D, 2 * F), param_dtype, ("expert", "embed", "mlp"))
        w_down = param(self, "down_proj", dense_init(cfg.initializer_range * cfg.output_init_scale), (E, F, D),
                       param_dtype, ("expert", "mlp", "embed"))
        w_gate_up, w_down = w_gate_up.astype(dtype), w_down.astype(dtype)
        fp8 = gmm_fp8_args()
        args = (x_ND, weights_NK.astype(dtype), experts_NK, w_gate_up, w_down)
        # a decode or verify step's few tokens are never sliced
        chunks = 1 if B * T * cfg.experts_per_token <= FEW_ROWS_MAX else cfg.moe_token_chunks
        if expert_parallel_size(E) > 1:
            y_ND = in_token_chunks(functools.partial(shard_experts, expert_parallel_dispatch(cfg, fp8)), chunks)(*args)
        else:
            def local(x, w, e, wgu, wd):
                return dispatch_combine(x, w, e, wgu, wd, impl=cfg.moe_impl, capacity_factor=cfg.capacity_factor,
                                        fp8=fp8)

            if resolve_impl(cfg.moe_impl) == "pallas":
                # Mosaic kernels cannot be partitioned by XLA: run per token shard, expert weights gathered
                tokens, weights = ("tokens", None), (None, None, None)
                y_ND = shard_kernel(lambda *a: (in_token_chunks(local, chunks)(*a),), args,
                                    (tokens, tokens, tokens, weights, weights), (tokens,))[0]
            else:
                y_ND = in_token_chunks(local, chunks)(*args)
        if cfg.shared_expert_intermediate_size:
            shared = SwiGLU(D, cfg.shared_expert_intermediate_size, dtype, param_dtype, cfg.initializer_range,
                            cfg.initializer_range * cfg.output_init_scale, name="shared_expert")(x_ND)
            w_sg = param(self, "shared_expert_gate", init, (D, 1), param_dtype, ("embed", None))
            y_ND = y_ND + jax.nn.sigmoid(jnp.dot(x_ND, w_sg.astype(dtype))) * shared
        return y_ND.reshape(B, T, D), stats
