"""Speculative decoding with state checkpoints: the per-position recurrence against the reference, the checkpointed
GDN decode path against plain decoding, no Gated DeltaNet layer runs a token twice in a round, prefill never forms
[B, T, V] logits, greedy speculation equals plain greedy on an all-GDN stack, and the sampling acceptance rule
samples the main model's distribution (chi-square against the exact probabilities)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule.reference import recurrent_gated_delta_rule, recurrent_gated_delta_rule_states
from qwen35_jax import forward, generate, init_params, load_config
from qwen35_jax import model as model_lib
from qwen35_jax.generation import Sampling, _programs, _speculative_programs, accept
from qwen35_jax.layers import gdn
from qwen35_jax.model import checkpoint_cache, forward_cached, init_cache, init_mtp_cache, select_checkpoint


def chi_square_pvalue(observed, expected) -> float:
    """Pearson's chi-square test of counts against expected counts (same total), df = cells - 1."""
    observed, expected = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    stat = np.sum((observed - expected) ** 2 / expected)
    return float(jax.scipy.special.gammaincc((len(observed) - 1) / 2, stat / 2))


def small_cfg(pattern="GGGA", vocab=61, **kw):
    return load_config("tiny", vocab_size=vocab, hidden_size=32, num_layers=4, layer_pattern=pattern, num_heads=2,
                       num_kv_heads=1, head_dim=16, gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8,
                       gdn_value_dim=8, num_experts=4, experts_per_token=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, gdn_chunk_size=16, mtp_num_layers=1,
                       initializer_range=0.2, max_position_embeddings=256, **kw)


def test_states_recurrence_matches_the_reference_on_every_prefix():
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(0)
        B, T, Hk, Hv, dk, dv = 2, 5, 1, 2, 4, 3
        q, k = rng.normal(size=(B, T, Hk, dk)), rng.normal(size=(B, T, Hk, dk))
        v, g = rng.normal(size=(B, T, Hv, dv)), -np.abs(rng.normal(size=(B, T, Hv)))
        beta, S0 = 1 / (1 + np.exp(-rng.normal(size=(B, T, Hv)))), rng.normal(size=(B, Hv, dk, dv))
        o, states = recurrent_gated_delta_rule_states(q, k, v, g, beta, initial_state=S0, use_qk_l2norm=True)
        assert states.shape == (B, T, Hv, dk, dv) and states.dtype == jnp.float64
        o_ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S0, use_qk_l2norm=True)
        np.testing.assert_allclose(o, o_ref, rtol=1e-12)
        for t in range(1, T + 1):
            _, S_t = recurrent_gated_delta_rule(q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t],
                                                initial_state=S0, output_final_state=True, use_qk_l2norm=True)
            np.testing.assert_allclose(states[:, t - 1], S_t, rtol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("pattern", ["GGGA", "GGGG"])
def test_checkpoint_selected_at_any_position_equals_decoding_that_prefix(pattern):
    """A checkpointed pass over 4 tokens, then per-row selection at different positions (rows 0 and 1 keep 2 and 4
    tokens): continuing from there matches plain decoding of exactly those tokens."""
    cfg = small_cfg(pattern)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16))
    P, keep = 10, np.array([2, 4])
    cache = init_cache(cfg, 2, 24)
    _, _, cache = forward_cached(cfg, params, tokens[:, :P], cache)
    _, _, verified = forward_cached(cfg, params, tokens[:, P:P + 4], checkpoint_cache(dict(cache)))
    rolled = dict(select_checkpoint(verified, keep - 1), index=jnp.asarray(P + keep, jnp.int32))
    nxt = np.stack([tokens[b, P + keep[b]] for b in range(2)])[:, None]
    pos = (P + keep)[:, None]
    got, _, _ = forward_cached(cfg, params, nxt, rolled, positions=pos)
    full = np.asarray(forward(cfg, params, tokens))
    for b in range(2):
        np.testing.assert_allclose(got[b, 0], full[b, P + keep[b]], rtol=1e-4, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("k", [1, 3])
def test_no_gdn_layer_runs_a_token_twice_in_a_round(monkeypatch, k):
    """Count the tokens each traced Gated DeltaNet delta-rule call processes: one draft-verify round does exactly
    the GDN work of one forward over its k+1 tokens (the pre-checkpoint round re-ran the accepted prefix: 2x)."""
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    calls = []

    def counting(fn):
        def wrapped(q, *args, **kwargs):
            calls.append(q.shape[1])
            return fn(q, *args, **kwargs)
        return wrapped

    for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule_states", "rule_per_shard"):
        monkeypatch.setattr(gdn, name, counting(getattr(gdn, name)))

    def fresh_traces():  # forward_cached's compiled program keeps its trace: retrace so the counters see every call
        model_lib._jitted_cached_forward.cache_clear()

    fresh_traces()
    start, verify_round, run_rounds = _speculative_programs.__wrapped__(cfg, Sampling(), k)
    cache = checkpoint_cache(dict(init_cache(cfg, 1, 64), index=jnp.zeros((1,), jnp.int32)))
    mtp_cache = dict(init_mtp_cache(cfg, 1, 64), index=jnp.zeros((1,), jnp.int32))
    args = (params, cache, mtp_cache, jnp.zeros((1,), jnp.int32), jnp.zeros((1, k), jnp.int32),
            jnp.zeros((1, k, 0)), jnp.zeros((1,), jnp.int32), jax.random.key(0))
    jax.make_jaxpr(verify_round)(*args)
    round_calls, calls[:] = calls[:], []
    fresh_traces()
    jax.make_jaxpr(lambda p, t, c: forward_cached(cfg, p, t, c))(params, jnp.zeros((1, k + 1), jnp.int32), cache)
    assert calls and set(calls) == {k + 1}
    assert sorted(round_calls) == sorted(calls)
    # the compiled loop of rounds, too (its body is one round)
    calls[:] = []
    fresh_traces()
    state = (cache, mtp_cache) + args[3:]
    jax.make_jaxpr(run_rounds)(params, state, jnp.array([-1]), jnp.array([8]), jnp.array([False]))
    assert sorted(calls) == sorted(round_calls)


def test_prefill_never_forms_full_vocabulary_logits():
    cfg = small_cfg(vocab=67)
    params = init_params(cfg, jax.random.key(0))
    B, P, V = 3, 40, cfg.vocab_size  # P differs from every model dim

    def shapes(jaxpr):
        out = set()
        for eqn in jaxpr.eqns:
            out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                out |= shapes(sub)
        return out

    tokens, seg, pos = jnp.zeros((B, P), jnp.int32), jnp.ones((B, P), jnp.int32), jnp.tile(jnp.arange(P), (B, 1))
    cache = init_cache(cfg, B, P + 8)
    full = jax.make_jaxpr(lambda p, t, c: forward_cached(cfg, p, t, c))(params, tokens, cache)
    assert (B, P, V) in shapes(full.jaxpr)  # the walker sees the [B, T, V] logits when they exist
    prefill, _ = _programs.__wrapped__(cfg, Sampling(), 4)
    plain = jax.make_jaxpr(prefill)(params, tokens, seg, pos, cache, jax.random.key(0))
    start, _, _ = _speculative_programs.__wrapped__(cfg, Sampling(temperature=1.0), 2)
    spec = jax.make_jaxpr(start)(params, tokens, seg, pos, cache, init_mtp_cache(cfg, B, P + 8), jax.random.key(0))
    for jaxpr in (plain, spec):
        found = shapes(jaxpr.jaxpr)
        assert (B, 1, V) in found and not any(s[-1:] == (V,) and P in s for s in found)


def test_speculative_greedy_equals_plain_greedy_all_gdn():
    cfg = small_cfg("GGGG")
    params = init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, 61, n)) for n in (7, 30)]
    plain = generate(cfg, params, prompts, max_new_tokens=20).tokens
    stop = plain[1][9]
    plain_stop = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[stop]).tokens
    assert generate(cfg, params, prompts, max_new_tokens=20, speculative="mtp", draft_tokens=3).tokens == plain
    got = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[stop], speculative="mtp", draft_tokens=3)
    assert got.tokens == plain_stop


def test_acceptance_rule_samples_the_target_distribution():
    """`accept` alone, on fixed context-free p (target, k+1 rows) and q (draft, k rows): the token it emits at each
    reached position follows p there, though q differs a lot from p (chi-square, 40k draws, fixed seed)."""
    V, k, N = 6, 2, 40000
    rng = np.random.default_rng(0)
    logits_p = jnp.asarray(rng.normal(size=(k + 1, V)) * 1.5, jnp.float32)
    logq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(k, V)) * 1.5, jnp.float32), -1)
    s = Sampling(temperature=1.0)

    @jax.jit
    def one(key):
        kd, ka = jax.random.split(key)
        drafts = jax.random.categorical(kd, logq, axis=-1)[None].astype(jnp.int32)  # [1, k]
        a, y = accept(logits_p[None], drafts, logq[None], ka, s)
        return a[0], jnp.concatenate([drafts[0], jnp.zeros((1,), jnp.int32)]).at[a[0]].set(y[0])

    a, toks = jax.vmap(one)(jax.random.split(jax.random.key(1), N))
    a, toks = np.asarray(a), np.asarray(toks)
    p = np.asarray(jax.nn.softmax(logits_p, -1))
    for i in range(k + 1):
        reached = a >= i
        counts = np.bincount(toks[reached, i], minlength=V)
        assert chi_square_pvalue(counts, p[i] * reached.sum()) > 1e-3, (i, counts, p[i])
    assert 0.2 < np.mean(a >= 1) < 0.9  # q differs from p: drafts are rejected often enough to test the residual


def test_speculative_sampling_matches_the_model_end_to_end():
    """Batched speculative sampling (k = 2) of 3 tokens from one prompt in 3000 independent rows: the joint of the
    first two sampled tokens and the marginal of the third match the exact probabilities of the full forward."""
    V = 8
    cfg = small_cfg(vocab=V)
    params = init_params(cfg, jax.random.key(5))
    prompt, N = [1, 5, 2], 3000
    out = generate(cfg, params, [prompt] * N, max_new_tokens=3, temperature=1.0, speculative="mtp",
                   draft_tokens=2, seed=7)
    toks = np.array(out.tokens)
    assert toks.shape == (N, 3) and out.stats["acceptance_rate"] < 0.95
    grid = np.array([prompt + [a, b] for a in range(V) for b in range(V)])
    probs = np.asarray(jax.nn.softmax(forward(cfg, params, grid), -1))  # [V*V, 5, V]
    p1 = probs[0, 2]  # [V]
    p2 = probs[::V, 3]  # p(t2 | t1): [V, V] (row t1 * V + any t2)
    p3 = probs[:, 4].reshape(V, V, V)  # p(t3 | t1, t2)
    joint12 = p1[:, None] * p2
    marg3 = np.einsum("ab,abc->c", joint12, p3)
    counts12 = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    big = joint12.reshape(-1) * N >= 5  # chi-square needs expected counts >= 5: pool the rest
    exp = np.append(joint12.reshape(-1)[big] * N, joint12.reshape(-1)[~big].sum() * N)
    obs = np.append(counts12[big], counts12[~big].sum())
    assert chi_square_pvalue(obs, exp) > 1e-3
    assert chi_square_pvalue(np.bincount(toks[:, 2], minlength=V), marg3 * N) > 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_draft_and_verify_heads_give_the_parameters_logits(tied):
    """The MTP head's logits over a draft vocabulary equal the columns of its full-vocabulary logits, and the main
    model's logits through the [D, V] verify head equal its own."""
    cfg = small_cfg(tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(1)
    B, T = 2, 5
    hidden = jnp.asarray(rng.normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    ids = np.array([40, 3, 17, 0, 60, 22], np.int32)
    cache = init_mtp_cache(cfg, B, 16)
    full, u, _ = model_lib.mtp_forward_cached(cfg, params, hidden, nxt, cache)
    sub, u2, _ = model_lib.mtp_forward_cached(cfg, params, hidden, nxt, cache,
                                              head_VD=model_lib.draft_head(cfg, params, ids))
    assert sub.shape == (B, T, ids.size)
    np.testing.assert_allclose(sub, np.asarray(full)[..., ids], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(u, u2)
    # the verify pass's [D, V] head (a transposed copy when tied) gives the parameters' logits
    head_DV = model_lib.head_columns(cfg, params)
    assert head_DV.shape == (cfg.hidden_size, cfg.vocab_size)
    main = init_cache(cfg, B, 16)
    ref, h, _ = forward_cached(cfg, params, nxt, main)
    got, h2, _ = forward_cached(cfg, params, nxt, main, head_DV=head_DV)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(h, h2)


def test_draft_vocab_keeps_greedy_output_and_drafts_only_its_tokens():
    """With a draft vocabulary, greedy speculation still equals plain greedy (a batch, a stop token inside a round,
    budgets), every draft is one of its ids, and a vocabulary that misses the model's choices is accepted less."""
    from qwen35_jax.generation import _heads, _left_pad

    cfg = small_cfg("GGGA")
    params = init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, 61, n)) for n in (7, 30, 12)]
    plain = generate(cfg, params, prompts, max_new_tokens=20).tokens
    stop = plain[1][9]
    plain_stop = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[stop]).tokens
    made = sorted({t for row in plain for t in row})
    vocabs = {"the model's tokens": made + [t for t in range(61) if t not in made][:4],
              "none of them": [t for t in range(61) if t not in made]}
    rates = {}
    for name, ids in vocabs.items():
        out = generate(cfg, params, prompts, max_new_tokens=20, speculative="mtp", draft_tokens=3, draft_vocab=ids)
        assert out.tokens == plain, name
        got = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[stop], speculative="mtp",
                       draft_tokens=3, draft_vocab=ids)
        assert got.tokens == plain_stop, name
        rates[name] = out.stats["acceptance_rate"]
        start, _, _ = _speculative_programs(cfg, Sampling(), 3)
        toks, seg, pos = _left_pad(prompts, 32)
        P = toks.shape[1]
        drafts = start(params, toks, seg, pos, init_cache(cfg, 3, P + 8), init_mtp_cache(cfg, 3, P + 8),
                       jax.random.key(0), _heads(cfg, params, ids))[1]
        assert np.isin(np.asarray(drafts), ids).all(), name
    assert rates["none of them"] == 0 < rates["the model's tokens"]


def test_speculative_sampling_with_a_draft_vocabulary_matches_the_model():
    """Sampling with drafts restricted to half the vocabulary still samples the main model's distribution: the
    first two tokens' joint against the full forward (chi-square, 3000 rows), with drafts rejected often."""
    V = 8
    cfg = small_cfg(vocab=V)
    params = init_params(cfg, jax.random.key(5))
    prompt, N = [1, 5, 2], 3000
    out = generate(cfg, params, [prompt] * N, max_new_tokens=2, temperature=1.0, speculative="mtp",
                   draft_tokens=1, draft_vocab=[6, 1, 3, 4], seed=11)
    toks = np.array(out.tokens)
    assert 0.05 < out.stats["acceptance_rate"] < 0.9
    grid = np.array([prompt + [a] for a in range(V)])
    probs = np.asarray(jax.nn.softmax(forward(cfg, params, grid), -1))  # [V, 4, V]
    joint12 = probs[0, 2][:, None] * probs[:, 3]
    counts12 = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    big = joint12.reshape(-1) * N >= 5
    exp = np.append(joint12.reshape(-1)[big] * N, joint12.reshape(-1)[~big].sum() * N)
    obs = np.append(counts12[big], counts12[~big].sum())
    assert chi_square_pvalue(obs, exp) > 1e-3


def test_frequent_ids_and_bad_draft_vocabularies():
    from qwen35_jax import draft_vocab as dv
    from qwen35_jax.errors import UserError

    counts = dv.token_counts([[3, 3, 1, 4], [4, 3, 0]], 6)
    np.testing.assert_array_equal(counts, [1, 1, 0, 3, 2, 0])
    np.testing.assert_array_equal(dv.frequent_ids(counts, 4), [3, 4, 0, 1])  # ties by id
    np.testing.assert_array_equal(dv.frequent_ids(counts, 3, always=[5]), [5, 3, 4])
    assert dv.coverage(counts, [3, 4]) == 5 / 7
    with pytest.raises(UserError, match="token list 1: id 9"):
        dv.token_counts([[1], [9]], 6)
    with pytest.raises(UserError, match="size 7 must be in 1..6"):
        dv.frequent_ids(counts, 7)
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    for ids, msg in (([1, 61], "token id 61 is outside"), ([2, 2], "repeat"), ([], "non-empty")):
        with pytest.raises(UserError, match=msg):
            generate(cfg, params, [[1, 2]], max_new_tokens=4, speculative="mtp", draft_vocab=ids)
    with pytest.raises(UserError, match="needs speculative='mtp'"):
        generate(cfg, params, [[1, 2]], max_new_tokens=4, draft_vocab=[1])
