"""Multi-query associative recall (MQAR), following zoology's `multiquery_ar` (Arora et al., 2023, "Zoology").

A row of length T starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys from [1, V/2), values from
[V/2, V), no repeats within a row); the rest holds each key once more as a query, placed at an even offset drawn
without replacement from a power law (offset index i in [0, space) with weight a * (i+1)^(a-1), space =
(T - 2 * num_kv_pairs) / 2, a = 0.01 by default: short gaps are far more likely). After a query key the model must
emit its value: `targets[t]` is the value for the query key at position t (next-token convention) and is scored
there only; every other target is -100 and masked. Unused positions are random tokens from the whole vocabulary
(zoology's `random_non_queries`); as in zoology the answer itself is never written into the input.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def _sample_without_replacement(rng, n_rows: int, n_choices: int, size: int, log_p=None, rows_per_draw: int = 2048):
    """[n_rows, size] distinct indices in [0, n_choices) per row; weighted by exp(log_p) when given (Gumbel top-k,
    the same law as sequential sampling without replacement, as numpy's `choice(replace=False, p=...)`): the `size`
    highest of n_choices Gumbel scores per row, highest first. Drawn `rows_per_draw` rows at a time from the one
    stream (the same numbers as one draw of all rows) and selected with a partition, not a sort of every score: a
    zoology-sized vocabulary (4096 keys) over 100k rows stays seconds and megabytes."""
    out = np.empty((n_rows, size), np.int64)
    for start in range(0, n_rows, rows_per_draw):
        scores = rng.gumbel(size=(min(rows_per_draw, n_rows - start), n_choices))
        if log_p is not None:
            scores = scores + log_p
        top = np.argpartition(-scores, size - 1, axis=1)[:, :size] if size < n_choices else np.broadcast_to(
            np.arange(n_choices), scores.shape)
        order = np.lexsort((top, -np.take_along_axis(scores, top, 1)), axis=1)  # by score, ties by index
        out[start:start + len(scores)] = np.take_along_axis(top, order, 1)
    return out


def mqar(num_examples: int, seq_len: int, *, vocab_size: int, num_kv_pairs: int, seed: int | list[int] = 0,
         power_a: float = 0.01, random_non_queries: bool = True) -> dict[str, np.ndarray]:
    """An MQAR data set, deterministic in `seed`.

    Returns dict(tokens [N, T] int32, targets [N, T] int32 (-100 where not scored), loss_mask [N, T] float32
    (1 at the scored positions: exactly `num_kv_pairs` per row)).
    """
    if seq_len % 2:
        raise ValueError(f"MQAR seq_len must be even, got {seq_len}")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs 1 <= num_kv_pairs <= seq_len / 4; got num_kv_pairs={num_kv_pairs}, "
                         f"seq_len={seq_len}")
    key_vocab = vocab_size // 2
    if key_vocab - 1 < num_kv_pairs or vocab_size - key_vocab < num_kv_pairs:
        raise ValueError(f"MQAR vocab_size={vocab_size} is too small for {num_kv_pairs} distinct keys and values")
    rng = np.random.default_rng(seed)
    N, P = num_examples, num_kv_pairs
    keys = 1 + _sample_without_replacement(rng, N, key_vocab - 1, P)            # token 0 is left for "empty"
    values = key_vocab + _sample_without_replacement(rng, N, vocab_size - key_vocab, P)
    context = 2 * P
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    gaps = _sample_without_replacement(rng, N, space, P, log_p)                  # [N, P] query slots
    tokens = np.zeros((N, seq_len), np.int64)
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    rows = np.arange(N)[:, None]
    query_pos = context + 2 * gaps
    tokens[rows, query_pos] = keys
    targets = np.full((N, seq_len), IGNORE, np.int64)
    targets[rows, query_pos] = values
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=tokens.shape)
        tokens = np.where(tokens == 0, noise, tokens)
    return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": (targets != IGNORE).astype(np.float32)}


SCORES = ("accuracy", "value_in_context")


def mqar_scores(pred, batch) -> dict[str, float]:
    """Over the scored positions (`loss_mask`) of the predictions `pred [N, T]` (argmax of the logits; other
    positions are not read):

    - accuracy: the prediction is the target value;
    - value_in_context: the prediction is one of the row's values, right or wrong. A model that has learnt "answer
      with a value from this row" but not which one sits at accuracy ~ 1 / num_kv_pairs with this near 1: the
      plateau MQAR training crosses before recall (the induction-style lookup) forms.
    """
    pred = np.asarray(pred)
    mask = np.asarray(batch["loss_mask"]) > 0
    if pred.shape != mask.shape:
        raise ValueError(f"predictions {pred.shape} do not match MQAR batch targets {mask.shape}")
    if not mask.any():
        return dict.fromkeys(SCORES, float("nan"))
    targets = np.asarray(batch["targets"])
    row_values = np.where(mask, targets, -1)  # each row's values sit at its scored positions, once each
    in_row = (pred[:, :, None] == row_values[:, None, :]).any(-1)
    return {"accuracy": float((pred == targets)[mask].mean()), "value_in_context": float(in_row[mask].mean())}


def recall_step(curve, num_kv_pairs: int) -> float:
    """The first logged step at which the training loss on the answers is below half of ln(num_kv_pairs): the right
    value then has probability above 1 / sqrt(pairs) on average, which no answer drawn from the row's values
    without recall reaches (that plateau sits at ln(pairs) and above). NaN if the run never gets there.

    `curve` is the run's `[(step, loss), ...]`. At this budget a cell's accuracy is largely set by when its seed
    leaves the plateau (experiments/README.md (a4)); this step puts that on the record beside the accuracy.
    """
    if num_kv_pairs < 2:
        raise ValueError(f"recall_step needs at least 2 key-value pairs per row, got {num_kv_pairs}")
    threshold = 0.5 * np.log(num_kv_pairs)
    return next((float(step) for step, loss in curve if loss < threshold), float("nan"))


def mqar_accuracy(logits, batch) -> float:
    """Share of scored positions (`loss_mask`) where argmax(logits [N, T, V]) equals the target value."""
    return mqar_scores(np.asarray(logits).argmax(-1), batch)["accuracy"]
