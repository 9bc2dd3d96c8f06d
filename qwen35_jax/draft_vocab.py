"""Draft vocabularies for speculative decoding: the most frequent tokens of a corpus.

The MTP head's LM head reads the whole [V, D] embedding for every draft token, as much as a decoder layer on the
tiny model. Drafting among the V' most frequent tokens only (FR-Spec, Zhao et al. 2025; EAGLE-3's reduced draft
vocabulary) reads V' rows instead; a draft outside them could not have been proposed, which costs acceptance only
where the main model wanted a rare token. The output does not change: the main model verifies every draft over
the whole vocabulary (`generation.generate(draft_vocab=...)`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from qwen35_jax.errors import UserError


def token_counts(token_lists: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Occurrences of each id in `token_lists` (e.g. tokenised documents) as int64 [vocab_size]."""
    counts = np.zeros(vocab_size, np.int64)
    for i, ids in enumerate(token_lists):
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise UserError(f"token list {i}: id {int(bad)} is outside the vocabulary [0, {vocab_size})")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def frequent_ids(counts: np.ndarray, size: int, *, always: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent ids (int32, most frequent first; ties by id), with the ids in `always` (stop
    tokens, say) included whatever their count."""
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise UserError(f"counts must be 1-D [vocab_size], got shape {counts.shape}")
    if not 0 < size <= counts.shape[0]:
        raise UserError(f"draft vocabulary size {size} must be in 1..{counts.shape[0]} (the vocabulary)")
    forced = np.unique(np.asarray(always, np.int64))
    if forced.size > size:
        raise UserError(f"draft vocabulary size {size} is smaller than the {forced.size} ids it must include")
    boost = np.zeros(counts.shape[0], bool)
    boost[forced] = True
    order = np.lexsort((np.arange(counts.shape[0]), -counts, ~boost))  # forced first, then by count, then by id
    return order[:size].astype(np.int32)


def data_token_counts(spec, tokenizer, vocab_size: int, *, max_documents: int | None = None) -> np.ndarray:
    """`token_counts` over the documents of a data spec (what the trainer's `data` takes: 'stdlib', a path, a
    mapping; its train split unless the spec names one), tokenised by `tokenizer` (not needed for a tokenized
    source), at most `max_documents` of them."""
    from qwen35_jax.data.sources import document_source

    source = document_source(spec)
    if not len(source):
        raise UserError(f"draft vocabulary data {source.name}: no documents in its split")
    if tokenizer is None and not source.tokenized:
        raise UserError(f"draft vocabulary data {source.name} is text: it needs a tokenizer")
    n = len(source) if max_documents is None else min(len(source), max_documents)
    return token_counts((source[i] if source.tokenized else tokenizer.encode(source[i]) for i in range(n)),
                        vocab_size)


MAX_DOCUMENTS = 20000  # `pick` counts over at most this many documents by default


def pick(spec, tokenizer, vocab_size: int, size: int, *, always: Sequence[int] = (),
         max_documents: int | None = MAX_DOCUMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts): the `size` most frequent ids of a data spec's documents (`data_token_counts`), with `always`
    in, and the counts they were ranked by (for `coverage`). What `qwen35 generate --draft-vocab` uses."""
    counts = data_token_counts(spec, tokenizer, vocab_size, max_documents=max_documents)
    return frequent_ids(counts, size, always=always), counts


def run_data_spec(run_dir):
    """The training data spec of a `qwen35 train` run directory (its config.json `data`)."""
    import json

    from qwen35_jax import paths

    config = paths.path(run_dir) / "config.json"
    if not (paths.path(run_dir) / "checkpoints").exists() or not config.exists():
        raise UserError(f"{run_dir} is not a run directory (config.json + checkpoints/): give the data to count "
                        f"token frequencies on (generate: --draft-vocab-data)")
    return json.loads(config.read_text())["data"]


def coverage(counts: np.ndarray, ids: np.ndarray) -> float:
    """The fraction of the counted tokens that fall in `ids`."""
    counts = np.asarray(counts)
    return float(counts[np.asarray(ids)].sum() / max(counts.sum(), 1))
