"""The grain pipeline: documents -> tokens -> pieces of at most T predictions -> first-fit packed rows -> batches.

Packing design. A document's tokens d = [bos?] + encode(text) + [eos] are cut into pieces
d[k*T : k*T + T + 1]; a piece's inputs are its tokens but the last and its targets are its tokens shifted by one.
Every token of d but the first is a target exactly once, and targets never cross into another document, so no
row needs a mask at document boundaries. Pieces are packed first-fit into rows of T (grain's
FirstFitPackIterDataset). Each example (and each batch, with a leading batch dim B) is

    tokens      [T] int32    inputs; pad_id on padding
    targets     [T] int32    next tokens; pad_id on padding
    segment_ids [T] int32    1..n for the pieces in the row, 0 on padding
    positions   [T] int32    restart at 0 at the start of every piece
    loss_mask   [T] float32  1 on real tokens, 0 on padding

Order of operations: documents are sharded by process (disjoint), shuffled per epoch, repeated, tokenised, cut,
shuffled in a window of ~256k tokens of pieces (so one long file's pieces do not fill one batch), packed, batched.
The iterator's state is a small JSON-able dict; restoring it replays at most one shuffle window.
"""

from __future__ import annotations

import functools
import json

import grain
import numpy as np
from grain import experimental as gx

from qwen35_jax.data.sources import DocumentSource, document_source
from qwen35_jax.errors import UserError

FEATURES = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
WINDOW_TOKENS = 1 << 18  # shuffle-window size in tokens: restoring a state re-tokenises at most this much (~1 s)


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer, add_bos: bool):
        self.tokenizer, self.add_bos = tokenizer, add_bos

    def map(self, doc):
        ids = doc if isinstance(doc, np.ndarray) else self.tokenizer.encode(doc)
        bos = [self.tokenizer.bos_id] if self.add_bos else []
        return np.asarray(bos + list(ids) + [self.tokenizer.eos_id], np.int32)


class _Cut(grain.experimental.FlatMapTransform):
    """One document's tokens -> pieces {"tokens": [L], "targets": [L]} with L <= seq_len.

    `empty_limit` consecutive documents without a single target (a whole pass over a repeating source) mean that
    every document is empty: a UserError instead of the packer waiting forever for a piece."""

    def __init__(self, seq_len: int, empty_limit: int | None = None, name: str = ""):
        self.seq_len, self.empty_limit, self.name, self._empty_run = seq_len, empty_limit, name, 0
        self.max_fan_out = 1 << 30  # only the MapDataset flavour uses it

    def flat_map(self, ids):
        if len(ids) < 2:
            self._empty_run += 1
            if self.empty_limit is not None and self._empty_run >= self.empty_limit:
                raise UserError(f"{self.name}: all {self.empty_limit} documents are empty (no text to predict); "
                                f"nothing to train on")
        else:
            self._empty_run = 0
        pieces = []
        for s in range(0, len(ids) - 1, self.seq_len):
            e = min(s + self.seq_len, len(ids) - 1)
            pieces.append({"tokens": ids[s:e], "targets": ids[s + 1:e + 1]})
        return pieces


class _EpochShuffle(grain.MapDataset):
    """A fresh permutation of the parent every epoch (index i of epoch e: perm_e[i]); numpy rather than grain's
    index_shuffle, which costs about a millisecond per element on small datasets."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed, self._epoch, self._perm = seed, None, None

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, len(self._parent))
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
            self._epoch = epoch
        return self._parent[int(self._perm[i])]


class _Finish(grain.transforms.Map):
    """Grain's packed row -> the documented example dict."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def map(self, row):
        seg = row["tokens_segment_ids"].astype(np.int32)
        real = seg > 0
        return {"tokens": np.where(real, row["tokens"], self.pad_id).astype(np.int32),
                "targets": np.where(real, row["targets"], self.pad_id).astype(np.int32),
                "segment_ids": seg, "positions": row["tokens_positions"].astype(np.int32),
                "loss_mask": real.astype(np.float32)}


class DataIterator:
    """Iterates numpy batch dicts; `get_state()` is a JSON-able dict that `set_state` restores exactly."""

    def __init__(self, dataset: grain.IterDataset, *, pad_to: int | None = None, empty_batch: dict | None = None,
                 copy: bool = False):
        self._dataset, self._it = dataset, iter(dataset)
        self._pad_to, self._empty, self._emitted, self._copy = pad_to, empty_batch, 0, copy

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pad_to is not None and self._emitted >= self._pad_to:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            if self._pad_to is None:
                raise
            # Padding batches keep every process stepping through the same number of eval batches.
            batch = self._empty
        self._emitted += 1
        # Worker batches live in shared memory owned by grain; a plain copy frees it at once.
        return {k: np.array(v) for k, v in batch.items()} if self._copy or batch is self._empty else batch

    def get_state(self) -> dict:
        return json.loads(json.dumps({"grain": self._it.get_state(), "emitted": self._emitted}, default=_jsonable))

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise UserError(f"data iterator state must be a dict from get_state(), got {str(state)[:80]}")
        self._it.set_state(state["grain"])
        self._emitted = int(state.get("emitted", 0))


def _jsonable(x):
    if isinstance(x, np.integer):
        return int(x)
    raise TypeError(f"data iterator state holds a {type(x).__name__}, which is not JSON")


def state_to_bytes(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True).encode()


def state_from_bytes(data: bytes) -> dict:
    return json.loads(data.decode())


def _packed_rows(source: DocumentSource, tokenizer, *, seq_len: int, seed: int, shuffle: bool,
                 num_epochs: int | None, process_index: int, process_count: int, add_bos: bool,
                 num_bins: int) -> grain.IterDataset:
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    docs = grain.MapDataset.source(source)[process_index::process_count]
    n_docs = len(docs)
    if shuffle and len(docs):
        docs = _EpochShuffle(docs, seed)
    docs = docs.repeat(num_epochs).map(_Tokenize(tokenizer, add_bos))
    # Reading threads only add overhead here: tokenising holds the GIL. Parallelism comes from num_workers.
    docs = docs.to_iter_dataset(grain.ReadOptions(num_threads=0))
    pieces = gx.FlatMapIterDataset(docs, _Cut(seq_len, empty_limit=max(n_docs, 1) if num_epochs is None else None,
                                              name=source.name))
    if shuffle:
        pieces = gx.WindowShuffleIterDataset(pieces, window_size=min(4096, max(64, WINDOW_TOKENS // seq_len)),
                                             seed=(seed + 1) % 2**32)
    rows = gx.FirstFitPackIterDataset(pieces, length_struct={"tokens": seq_len, "targets": seq_len},
                                      num_packing_bins=num_bins, seed=(seed + 2) % 2**32, shuffle_bins=shuffle)
    return rows.map(_Finish(tokenizer.pad_id))


def make_dataset(spec, tokenizer, *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 num_workers: int = 0, add_bos: bool = False, vocab_size: int | None = None) -> DataIterator:
    """Training batches of this process's shard: dicts of `FEATURES` with shapes [batch_size, seq_len].

    `spec` is a data spec dict (see sources.py) or a DocumentSource. `num_epochs=None` repeats forever; a final
    partial batch is dropped. The order depends on (seed, process_index, process_count, num_workers): keep them
    fixed across a resume. `num_workers > 0` tokenises and packs in that many worker processes. Token ids read from
    tokenized data must lie in [0, vocab_size) (default: the tokenizer's), else a UserError names the record.
    """
    source = spec if isinstance(spec, DocumentSource) else document_source(spec)
    source.vocab_size = vocab_size or tokenizer.vocab_size
    if len(source) < process_count:
        raise UserError(f"{source.name} has {len(source)} documents in split {source.spec.get('split', 'train')!r}, "
                        f"fewer than the {process_count} processes that each need a share")
    rows = _packed_rows(source, tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                        process_index=process_index, process_count=process_count, add_bos=add_bos,
                        num_bins=max(2 * batch_size, 16))
    batches = rows.batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return DataIterator(batches, copy=num_workers > 0)


def make_eval_dataset(spec, tokenizer, *, seq_len: int, batch_size: int, process_index: int = 0,
                      process_count: int = 1, num_batches: int | None = None, add_bos: bool = False,
                      vocab_size: int | None = None) -> DataIterator:
    """One deterministic pass (no shuffling) over this process's shard of `spec`; the last batch is filled with
    padding rows (loss_mask 0). With `num_batches`, exactly that many batches: cut short, or padded with all-padding
    batches, so that every process runs the same number of eval steps."""
    source = spec if isinstance(spec, DocumentSource) else document_source(spec)
    source.vocab_size = vocab_size or tokenizer.vocab_size
    rows = _packed_rows(source, tokenizer, seq_len=seq_len, seed=0, shuffle=False, num_epochs=1,
                        process_index=process_index, process_count=process_count, add_bos=add_bos,
                        num_bins=max(2 * batch_size, 16))
    empty = _empty_batch(batch_size, seq_len, tokenizer.pad_id)
    batches = rows.batch(batch_size, drop_remainder=False).map(functools.partial(_pad_batch, empty=empty))
    return DataIterator(batches, pad_to=num_batches, empty_batch=empty)


def _empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict:
    shape = (batch_size, seq_len)
    return {"tokens": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32)}


def _pad_batch(batch: dict, empty: dict) -> dict:
    n = len(batch["tokens"])
    return {k: np.concatenate([v, empty[k][n:]]) for k, v in batch.items()}
