"""Generation: batched greedy equals the full forward and transformers' greedy `generate`; speculative MTP decoding
equals plain greedy for every row of a batch (the verify round accepts exactly the right prefix and rolls the caches
back; the compiled round loop stops at a stop token or the token budget inside a round); the CLI; clear errors for
bad input. tests/test_speculative.py: checkpoints, no token run twice, the sampling rule's distribution."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import forward, generate, hf, init_params, load_config
from qwen35_jax.errors import UserError
from qwen35_jax.generation import PROMPT_BUCKET, Sampling, _left_pad, _speculative_programs
from qwen35_jax.model import init_cache, init_mtp_cache
from tests.hf_fixtures import hf_model


@pytest.fixture(scope="module")
def model():
    cfg = load_config("tiny", vocab_size=61, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16,
                      gdn_num_key_heads=1, gdn_num_value_heads=2, gdn_key_dim=8, gdn_value_dim=8, num_experts=4,
                      experts_per_token=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      gdn_chunk_size=16, mtp_num_layers=1, initializer_range=0.2, max_position_embeddings=256)
    return cfg, init_params(cfg, jax.random.key(0))


def is_greedy_continuation(cfg, params, prompt, generated) -> bool:
    """One full forward over prompt + generated: every generated token is the argmax after its prefix."""
    logits = forward(cfg, params, np.array([list(prompt) + list(generated)]))[0]
    return np.argmax(logits[len(prompt) - 1:-1], -1).tolist() == list(generated)


def test_batched_greedy_equals_full_forward_argmax(model):
    cfg, params = model
    prompts = [list(range(1, 6)), list(np.random.default_rng(0).integers(0, 61, 40))]  # 5 and 40: two buckets
    out = generate(cfg, params, prompts, max_new_tokens=20, chunk=8)
    for p, got in zip(prompts, out.tokens):
        assert len(got) == 20 and is_greedy_continuation(cfg, params, p, got)
    assert len(set(out.tokens[1])) > 1  # a non-degenerate continuation


def test_stop_tokens_and_streaming(model):
    cfg, params = model
    full = generate(cfg, params, [[3, 4, 5]], max_new_tokens=12).tokens[0]
    stop = full[4]
    streamed = []
    out = generate(cfg, params, [[3, 4, 5]], max_new_tokens=12, stop_tokens=[stop], on_tokens=streamed.append)
    assert out.tokens[0] == full[:full.index(stop) + 1]
    assert [t for chunk in streamed for t in chunk[0]] == out.tokens[0]


@pytest.mark.parametrize("family", ["qwen3_5_dense_untied", "qwen3_5_moe"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    import torch

    ref_model = hf_model(family)
    ref_model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    prompt = [5, 17, 3, 88, 42, 9, 1]
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                 eos_token_id=None, pad_token_id=0)
    ours = generate(cfg, params, [prompt], max_new_tokens=16)
    assert ours.tokens[0] == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, k):
    """A batch of prompts of different lengths (rows accept different numbers of drafts): every row equals plain
    greedy; and top-k 1 sampling (greedy through the sampling acceptance rule) too."""
    cfg, params = model
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 61, n)) for n in (21, 5, 40)]
    plain = generate(cfg, params, prompts, max_new_tokens=24).tokens
    spec = generate(cfg, params, prompts, max_new_tokens=24, speculative="mtp", draft_tokens=k)
    assert spec.tokens == plain
    assert len(spec.stats["acceptance_per_position"]) == k
    if k == 1:
        return
    sampled = generate(cfg, params, prompts[:1], max_new_tokens=24, speculative="mtp", draft_tokens=k,
                       temperature=0.7, top_k=1, seed=3)
    assert sampled.tokens == plain[:1]


@pytest.mark.parametrize("right", [0, 1, 2, 3])
def test_verify_round_accepts_the_correct_prefix_and_rolls_back(model, right):
    """Drafts whose first `right` tokens are the true greedy continuation: the round accepts exactly those, emits
    the main model's next token, and leaves caches (the GDN checkpoint selected at the accepted position, KV caches
    rolled back by index) from which decoding continues exactly like the full forward."""
    cfg, params = model
    k = 3
    prompt = list(np.random.default_rng(2).integers(0, 61, 9))
    truth = generate(cfg, params, [prompt], max_new_tokens=k + 4).tokens[0]  # = full-forward greedy (tested above)
    s = Sampling()
    start, round_, _ = _speculative_programs(cfg, s, k)
    tokens, seg, pos = _left_pad([prompt], PROMPT_BUCKET)
    cache, mtp_cache = init_cache(cfg, 1, 64), init_mtp_cache(cfg, 1, 64)
    y, _, logq, cache, mtp_cache = start(params, tokens, seg, pos, cache, mtp_cache, jax.random.key(0))
    assert int(y[0]) == truth[0]
    drafts = np.array([truth[1:k + 1]], np.int32)
    drafts[:, right:] = (drafts[:, right:] + 1) % cfg.vocab_size  # wrong from position `right` on
    toks, a, y_next, _, _, cache, mtp_cache = round_(params, cache, mtp_cache, y, jnp.asarray(drafts), logq,
                                                     jnp.array([len(prompt)], jnp.int32), jax.random.key(1))
    assert int(a[0]) == right and int(y_next[0]) == truth[right + 1]
    assert int(cache["index"][0]) == PROMPT_BUCKET + right + 1
    # continue plain greedy decoding on the rolled-back cache
    from qwen35_jax.model import forward_cached

    n = len(prompt) + right + 1
    tok = int(y_next[0])
    for i in range(2):
        logits, _, cache = forward_cached(cfg, params, jnp.array([[tok]]), cache, positions=jnp.array([[n + i]]))
        tok = int(jnp.argmax(logits[0, 0]))
        assert tok == truth[right + 2 + i]


@pytest.fixture(scope="module")
def counting_model(model):
    """Next token = token + 1 (mod 32): one-hot embeddings, a shifted-identity LM head, blocks scaled down to small
    perturbations. The MTP head drafts the same, except that its embedding input swaps 14<->15 and 22<->23: long
    accepted runs and a few rejections."""
    V = 32
    cfg, params = model  # the blocks do not depend on the vocabulary: reuse them
    cfg = cfg.replace(vocab_size=V, tie_word_embeddings=False)
    eye = np.eye(V, dtype=np.float32)
    swap = np.arange(V)
    swap[[14, 15, 22, 23]] = [15, 14, 23, 22]
    small = lambda tree: jax.tree.map(lambda x: 0.1 * x, tree)  # noqa: E731
    mtp = dict(params["mtp"], fc={"kernel": jnp.asarray(np.concatenate([eye[swap], 0 * eye]))},
               layers_0=small(params["mtp"]["layers_0"]))
    return cfg, dict(params, embed_tokens={"embedding": jnp.asarray(eye)}, lm_head=jnp.asarray(np.roll(eye, 1, 1)),
                     layers=small(params["layers"]), mtp=mtp)


def test_compiled_speculative_loop_stops_inside_a_round(counting_model):
    """A stop token in the middle of an accepted draft run, and max_new_tokens ending inside a round: the on-device
    loop emits exactly plain greedy's tokens, truncated at the same place."""
    cfg, params = counting_model
    prompt, k = [3, 4, 5], 3
    plain = generate(cfg, params, [prompt], max_new_tokens=24).tokens[0]
    assert plain == list(range(6, 30))
    spec = generate(cfg, params, [prompt], max_new_tokens=24, speculative="mtp", draft_tokens=k)
    assert spec.tokens[0] == plain
    # 6 from the prefill, then rounds [7 8 9 10] [11 12 13 14] [15] [16] [17 18 19 20] [21 22 23] [24] [25 26 27 28]
    # and [29 ..] (cut by the budget): 17 of 27 drafts accepted
    assert spec.stats["rounds"] == 9 and spec.stats["acceptance_rate"] == 17 / 27
    streamed = []
    out = generate(cfg, params, [prompt], max_new_tokens=16, stop_tokens=[31, 8], speculative="mtp", draft_tokens=k,
                   on_tokens=streamed.append)
    assert out.tokens[0] == [6, 7, 8] and [t for c in streamed for t in c[0]] == out.tokens[0]
    assert generate(cfg, params, [prompt], max_new_tokens=13, speculative="mtp", draft_tokens=k).tokens[0] == plain[:13]
    # a batch: rows draft through the swaps at different rounds, and one stops in a round the other continues
    prompts = [[3, 4, 5], [9, 10], [20]]
    plain = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[27]).tokens
    assert plain[2][-1] == 27 and len(plain[2]) < 20
    spec = generate(cfg, params, prompts, max_new_tokens=20, stop_tokens=[27], speculative="mtp", draft_tokens=k)
    assert spec.tokens == plain


def test_bad_input_is_a_clear_error(model):
    cfg, params = model
    with pytest.raises(UserError, match="prompt 0 is empty"):
        generate(cfg, params, [[]])
    with pytest.raises(UserError, match="token id 61 is outside the vocabulary"):
        generate(cfg, params, [[1, 61]])
    with pytest.raises(UserError, match="exceed the model's context of 256"):
        generate(cfg, params, [[1] * 250], max_new_tokens=10)
    with pytest.raises(UserError, match="draft_tokens must be >= 1"):
        generate(cfg, params, [[1], [2]], speculative="mtp", draft_tokens=0)
    with pytest.raises(UserError, match="top_p must be in"):
        generate(cfg, params, [[1]], top_p=0.0)
    with pytest.raises(UserError, match="no MTP head"):
        generate(cfg.replace(mtp_num_layers=0), params, [[1]], speculative="mtp")


def test_cli_prints_the_same_ids_as_the_api(tmp_path):
    ref_model = hf_model("qwen3_5_dense_tied")
    ref_model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    expected = generate(cfg, params, [[4, 8, 15, 16]], max_new_tokens=6).tokens[0]
    out = subprocess.run([sys.executable, "-m", "qwen35_jax.cli", "generate", str(tmp_path), "--prompt-ids",
                          "4,8,15,16", "--max-new-tokens", "6", "--print-ids"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == " ".join(map(str, expected))
    bad = subprocess.run([sys.executable, "-m", "qwen35_jax.cli", "generate", str(tmp_path), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "has no tokenizer" in bad.stderr and "Traceback" not in bad.stderr
