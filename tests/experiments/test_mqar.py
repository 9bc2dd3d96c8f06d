"""MQAR generator: zoology's layout (key/value vocabulary halves, queries after the context, only answers scored),
determinism, and the accuracy metric."""

import numpy as np
import pytest

from experiments.mqar import IGNORE, mqar, mqar_accuracy, mqar_scores, recall_step
from experiments.report import run_metrics

V, T, P = 128, 64, 8


@pytest.fixture(scope="module")
def batch():
    return mqar(200, T, vocab_size=V, num_kv_pairs=P, seed=3)


def test_shapes_dtypes_and_determinism(batch):
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (200, T)
    assert (batch["tokens"].dtype, batch["targets"].dtype, batch["loss_mask"].dtype) == (np.int32, np.int32,
                                                                                         np.float32)
    again = mqar(200, T, vocab_size=V, num_kv_pairs=P, seed=3)
    for k in batch:
        np.testing.assert_array_equal(batch[k], again[k])
    assert not np.array_equal(mqar(200, T, vocab_size=V, num_kv_pairs=P, seed=4)["tokens"], batch["tokens"])
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() < V


def test_keys_values_and_scored_positions(batch):
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    keys, values = tokens[:, 0:2 * P:2], tokens[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(r)) == P for r in keys) and all(len(set(r)) == P for r in values)
    np.testing.assert_array_equal(mask, (targets != IGNORE).astype(np.float32))
    assert (mask.sum(1) == P).all() and not mask[:, :2 * P].any()
    for n in range(len(tokens)):
        pos = np.flatnonzero(mask[n])
        assert ((pos - 2 * P) % 2 == 0).all()  # queries sit at even offsets after the context
        answer = dict(zip(keys[n], values[n]))
        assert sorted(tokens[n, pos]) == sorted(keys[n])  # each key queried once
        assert all(targets[n, t] == answer[tokens[n, t]] for t in pos)


def test_gaps_follow_a_power_law(batch):
    offsets = (np.flatnonzero(batch["loss_mask"].ravel()) % T - 2 * P) // 2
    space = (T - 2 * P) // 2
    counts = np.bincount(offsets, minlength=space)
    assert counts[: space // 4].sum() > counts[-space // 4:].sum()  # short gaps dominate


def test_accuracy_and_bad_input(batch):
    logits = np.zeros((200, T, V), np.float32)
    assert mqar_accuracy(logits, batch) == 0.0
    rows, cols = np.nonzero(batch["loss_mask"])
    logits[rows, cols, batch["targets"][rows, cols]] = 1.0
    assert mqar_accuracy(logits, batch) == 1.0
    logits[rows[0], cols[0]] = 0.0
    logits[rows[0], cols[0], 0] = 1.0
    assert mqar_accuracy(logits, batch) == pytest.approx(1 - 1 / len(rows))
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar(2, 16, vocab_size=V, num_kv_pairs=5)
    with pytest.raises(ValueError, match="even"):
        mqar(2, 33, vocab_size=V, num_kv_pairs=2)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(2, 64, vocab_size=10, num_kv_pairs=8)


def test_value_in_context_is_the_plateau_diagnostic(batch):
    """Answering every query of a row with that row's first value: accuracy 1/P, value_in_context 1; answering
    with the next row's values (distinct from this row's with high probability) counts only the coincidences."""
    rows, cols = np.nonzero(batch["loss_mask"])
    first_value = batch["tokens"][:, 1]  # k1 v1 ...: the row's first value
    logits = np.zeros((200, T, V), np.float32)
    logits[rows, cols, first_value[rows]] = 1.0
    scores = mqar_scores(logits.argmax(-1), batch)
    assert scores["accuracy"] == pytest.approx(1 / P) and scores["value_in_context"] == 1.0
    logits[:] = 0.0
    other = np.roll(batch["tokens"][:, 1], 1)[rows]
    logits[rows, cols, other] = 1.0
    own_values = [set(batch["tokens"][n, 1:2 * P:2]) for n in range(200)]
    expected = np.mean([o in own_values[n] for n, o in zip(rows, other)])
    assert mqar_scores(logits.argmax(-1), batch)["value_in_context"] == pytest.approx(expected)


def test_recall_step_is_where_the_loss_beats_one_over_root_pairs():
    """The plateau (uniform over the row's values, loss ln P) never counts; the first logged step whose loss is
    below -ln(1 / sqrt(P)) (the right value's probability above 1 / sqrt(P)) does."""
    pairs = 16
    plateau, threshold = -np.log(1 / pairs), -np.log(1 / np.sqrt(pairs))
    curve = [(10, 5.5), (20, plateau), (30, threshold + 1e-6), (40, threshold - 1e-6), (50, 0.1)]
    assert recall_step(curve, pairs) == 40
    assert np.isnan(recall_step(curve[:3], pairs))
    with pytest.raises(ValueError, match="2 key-value pairs"):
        recall_step(curve, 1)
    run = {"metrics": {"accuracy": 0.5}, "seq_len": 64, "train_loss": curve, "spec": {"settings": {"num_kv_pairs": 16}}}
    assert run_metrics("mqar", run) == {"accuracy": 0.5, "recall_step": 40.0}
    run["spec"]["settings"]["train_kv_pairs"] = [8, 16]  # rows of several counts: no one threshold, no step
    assert run_metrics("mqar", run) == {"accuracy": 0.5}


def test_training_rows_mix_pair_counts():
    """`mqar.train_kv_pairs`: the training rows split evenly over the listed counts (each row scores exactly its own
    count of queries), each part from its own stream, deterministic in the seed."""
    import functools

    from experiments.mqar_train import _training_rows

    gen = functools.partial(mqar, vocab_size=V, num_kv_pairs=P)
    rows = _training_rows(gen, 10, T, [2, 8, 8], seed=5)
    counts = rows["loss_mask"].sum(1).astype(int).tolist()
    assert counts == [2] * 4 + [8] * 3 + [8] * 3  # the first entries take the remainder
    assert not np.array_equal(rows["tokens"][4:7], rows["tokens"][7:10])  # a repeated count is its own stream
    again = _training_rows(gen, 10, T, [2, 8, 8], seed=5)
    for k in rows:
        np.testing.assert_array_equal(rows[k], again[k])
    np.testing.assert_array_equal(_training_rows(gen, 10, T, None, seed=5)["tokens"],
                                  mqar(10, T, vocab_size=V, num_kv_pairs=P, seed=5)["tokens"])


def test_training_loss_and_predictions_use_the_head_at_scored_positions_only():
    """The training step's loss (the LM head run on the gathered [B, T / 4] scored rows only) is the float64 cross
    entropy of `forward`'s full logits at every scored position, and `predict` is their argmax there (-1 elsewhere),
    also for rows with fewer scored positions than T / 4 (a pair-count mix)."""
    import functools

    import jax
    import jax.numpy as jnp

    from experiments.mqar_train import _training_rows, programs
    from qwen35_jax import load_config
    from qwen35_jax.model import forward

    cfg = load_config("tiny").replace(vocab_size=V, hidden_size=32, num_layers=2, layer_pattern=("conv", "gdn"),
                                      num_experts=0, intermediate_size=64, mtp_num_layers=0, scan_layers=False)
    gen = functools.partial(mqar, vocab_size=V, num_kv_pairs=P)
    data = _training_rows(gen, 6, T, [3, 8, 16], seed=1)  # 3, 8 and 16 (= T / 4) scored positions per row
    init, steps, predict = programs(cfg, 10, 2, 0.0, 0.0, "cosine")
    state = init(jax.random.key(0))
    logits = np.asarray(forward(cfg, state["params"], jnp.asarray(data["tokens"])), np.float64)
    mask = data["loss_mask"] > 0
    rows, cols = np.nonzero(mask)
    z = logits[rows, cols]
    ce = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(len(z)),
                                                                              data["targets"][rows, cols]]
    pred = np.asarray(predict(state["params"], jnp.asarray(data["tokens"]), jnp.asarray(data["loss_mask"])))
    np.testing.assert_array_equal(pred[mask], logits.argmax(-1)[mask])
    assert (pred[~mask] == -1).all()
    _, losses = steps(state, {k: jnp.asarray(v)[None] for k, v in data.items()}, jnp.float32(0.0))
    np.testing.assert_allclose(float(losses[0]), ce.mean(), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_sampling_in_row_draws_is_one_sort_of_one_draw(weighted):
    """The partitioned draw in row blocks selects what one Gumbel draw of every row, sorted whole, selects (the
    recorded data sets stay the same numbers)."""
    from experiments.mqar import _sample_without_replacement

    n, k, size = 37, 50, 9
    log_p = np.log(np.arange(1, k + 1, dtype=np.float64) ** -0.99) if weighted else None
    scores = np.random.default_rng(11).gumbel(size=(n, k)) + (0 if log_p is None else log_p)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :size]
    got = _sample_without_replacement(np.random.default_rng(11), n, k, size, log_p, rows_per_draw=8)
    np.testing.assert_array_equal(got, expected)
    whole = _sample_without_replacement(np.random.default_rng(11), n, k, k, log_p, rows_per_draw=8)
    np.testing.assert_array_equal(whole, np.argsort(-scores, axis=1, kind="stable"))
