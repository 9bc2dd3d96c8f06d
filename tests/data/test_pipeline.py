"""The grain pipeline: packing invariants, determinism, exact resume, process sharding, eval passes."""

import collections

import numpy as np
import pytest

from qwen35_jax.data import pipeline
from qwen35_jax.data.pipeline import make_dataset, make_eval_dataset, state_from_bytes, state_to_bytes
from qwen35_jax.errors import UserError

T = 16


class IntTokenizer:
    """Text is whitespace-separated token ids, so tests can read documents straight off the batches."""

    vocab_size, bos_id, eos_id, pad_id = 1 << 20, 2, 1, 0

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def doc_ids(i, n):
    return [1000 * (i + 1) + j for j in range(n)]  # unique per document: id // 1000 - 1 is the document


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs")
    lengths = np.random.default_rng(0).integers(0, 3 * T, size=40)
    for i, n in enumerate(lengths):
        (path / f"{i:02d}.txt").write_text(" ".join(map(str, doc_ids(i, n))))
    return {"kind": "text", "path": str(path), "split": "all"}, [doc_ids(i, n) + [1] for i, n in enumerate(lengths)]


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def check_row_invariants(batch):
    assert set(batch) == set(pipeline.FEATURES)
    for k in pipeline.FEATURES:
        assert batch[k].shape == batch["tokens"].shape and batch[k].dtype == (
            np.float32 if k == "loss_mask" else np.int32)
    for tok, tgt, seg, pos, mask in zip(*(batch[k] for k in pipeline.FEATURES)):
        real = seg > 0
        assert (mask == real).all() and (tok[~real] == 0).all() and (tgt[~real] == 0).all()
        ids = seg[real]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and real[: real.sum()].all()
        for s in np.unique(ids):
            where = seg == s
            assert (pos[where] == np.arange(where.sum())).all()
            assert (tok[where][1:] == tgt[where][:-1]).all()  # targets are the inputs shifted by one


def test_packing_invariants_and_every_token_once_per_epoch(folder):
    spec, docs = folder
    batches = list(make_dataset(spec, IntTokenizer(), seq_len=T, batch_size=1, seed=0, num_epochs=1))
    for b in batches:
        check_row_invariants(b)
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    inputs = np.concatenate([b["tokens"][b["loss_mask"] > 0] for b in batches])
    assert collections.Counter(targets.tolist()) == collections.Counter(t for d in docs for t in d[1:])
    assert collections.Counter(inputs.tolist()) == collections.Counter(t for d in docs for t in d[:-1])
    assert np.mean([b["loss_mask"].mean() for b in batches]) > 0.7  # first-fit keeps padding modest


def test_bos_is_prepended_when_asked(folder):
    spec, docs = folder
    batches = list(make_dataset(spec, IntTokenizer(), seq_len=T, batch_size=1, seed=0, num_epochs=1,
                                add_bos=True, shuffle=False))
    starts = [b["tokens"][0][b["positions"][0] == 0] for b in batches]
    assert (np.concatenate(starts) == 2).sum() == sum(len(d) > 0 for d in docs)


def test_same_seed_same_batches_other_seed_other_batches(folder):
    spec, _ = folder
    kw = dict(seq_len=T, batch_size=4, num_epochs=None)
    a = take(make_dataset(spec, IntTokenizer(), seed=7, **kw), 12)
    b = take(make_dataset(spec, IntTokenizer(), seed=7, **kw), 12)
    c = take(make_dataset(spec, IntTokenizer(), seed=8, **kw), 12)
    assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("skip", [3, 17])  # mid first epoch; inside the second epoch
def test_resume_from_saved_state_gives_identical_batches(folder, skip):
    spec, _ = folder
    kw = dict(seq_len=T, batch_size=4, seed=3)
    it = make_dataset(spec, IntTokenizer(), **kw)
    take(it, skip)
    saved = state_to_bytes(it.get_state())
    expected = take(it, 8)
    resumed = make_dataset(spec, IntTokenizer(), **kw)
    resumed.set_state(state_from_bytes(saved))
    assert same(take(resumed, 8), expected)


def test_process_shards_are_disjoint_and_cover_the_data(folder):
    spec, docs = folder
    seen = []
    for p in range(2):
        it = make_dataset(spec, IntTokenizer(), seq_len=T, batch_size=1, seed=5, num_epochs=1,
                          process_index=p, process_count=2)
        tokens = np.concatenate([b["tokens"][b["loss_mask"] > 0] for b in it])
        seen.append({t // 1000 - 1 for t in tokens.tolist()})
    assert seen[0].isdisjoint(seen[1]) and seen[0] and seen[1]
    assert seen[0] | seen[1] == {i for i, d in enumerate(docs) if len(d) > 1}


def test_eval_pass_is_finite_deterministic_and_padded(folder):
    spec, docs = folder
    first = list(make_eval_dataset(spec, IntTokenizer(), seq_len=T, batch_size=4))
    assert same(first, list(make_eval_dataset(spec, IntTokenizer(), seq_len=T, batch_size=4)))
    assert all(b["tokens"].shape == (4, T) for b in first)
    assert sum(b["loss_mask"].sum() for b in first) == sum(len(d) - 1 for d in docs)
    padded = list(make_eval_dataset(spec, IntTokenizer(), seq_len=T, batch_size=4, num_batches=len(first) + 3))
    assert same(padded[: len(first)], first) and all(b["loss_mask"].sum() == 0 for b in padded[len(first):])
    assert len(list(make_eval_dataset(spec, IntTokenizer(), seq_len=T, batch_size=4, num_batches=2))) == 2


def test_bad_jsonl_line_surfaces_through_the_pipeline(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "5 6"}\n{"text": 5 6}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: bad JSON"):
        list(make_dataset({"kind": "jsonl", "path": str(tmp_path), "split": "all"}, IntTokenizer(), seq_len=T,
                          batch_size=1, seed=0, num_epochs=1, shuffle=False))


def test_too_few_documents_for_the_processes(tmp_path):
    (tmp_path / "one.txt").write_text("5 6 7")
    with pytest.raises(UserError, match="fewer than the 2 processes"):
        make_dataset({"kind": "text", "path": str(tmp_path), "split": "all"}, IntTokenizer(), seq_len=T,
                     batch_size=1, seed=0, process_count=2)


def test_worker_processes_resume_exactly(folder):
    spec, _ = folder
    kw = dict(seq_len=T, batch_size=4, seed=1, num_workers=2)
    it = make_dataset(spec, IntTokenizer(), **kw)
    take(it, 2)
    saved = state_to_bytes(it.get_state())
    expected = take(it, 4)
    resumed = make_dataset(spec, IntTokenizer(), **kw)
    resumed.set_state(state_from_bytes(saved))
    got = take(resumed, 4)
    for b in got:
        check_row_invariants(b)
    assert same(got, expected)
