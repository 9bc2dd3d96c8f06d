"""Bad data and tokenizer inputs: each a one-line UserError naming the file, record or id (never a NaN loss, a
made-up validation loss or an iterator that waits forever), and the sensible fallback where one exists."""

import logging
import types

import numpy as np
import pytest

from qwen35_jax.data import tokenizer as tk
from qwen35_jax.data.pipeline import make_dataset, make_eval_dataset
from qwen35_jax.data.sources import document_source
from qwen35_jax.errors import UserError
from qwen35_jax.train import data as train_data

TOK = types.SimpleNamespace(vocab_size=64, bos_id=None, eos_id=1, pad_id=0, encode=lambda t: [5] * len(t.split()))


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_token_ids_outside_the_vocabulary_name_the_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "ids.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    for ids in ([5, 6, 7, 8], [9, 10, 64, 11, 70]):
        w.write(np.array(ids, "<i4").tobytes())
    w.close()
    spec = {"kind": "array_record", "path": str(path), "split": "all", "tokenized": True}
    it = make_dataset(spec, TOK, seq_len=4, batch_size=1, seed=0, shuffle=False, vocab_size=64)
    with pytest.raises(UserError) as e:
        for _ in range(10):
            next(it)
    assert one_line(e) == (f"{path}#1: token id 64 at position 2 is outside the vocabulary [0, 64) (2 such ids in "
                           f"this record); was the data tokenized for another model?")
    ok = make_dataset(spec, TOK, seq_len=4, batch_size=1, seed=0, shuffle=False, vocab_size=71)
    assert next(ok)["tokens"].shape == (1, 4)  # the same data fits a larger vocabulary


def test_every_document_empty_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    it = make_dataset({"kind": "text", "path": str(tmp_path), "split": "all"}, TOK, seq_len=8, batch_size=2, seed=0)
    with pytest.raises(UserError) as e:
        next(it)
    assert one_line(e) == f"text:{tmp_path}: all 3 documents are empty (no text to predict); nothing to train on"


def test_a_glob_with_no_matches_names_the_pattern(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError) as e:
        document_source({"kind": "array_record", "path": f"{tmp_path}/train/*.array_record"})
    assert "no files match '*.array_record' under" in one_line(e) and str(tmp_path / "train") in str(e.value)
    assert len(document_source({"kind": "text", "path": f"{tmp_path}/*.txt", "split": "all"})) == 1


def _tcfg(tmp_path, **kw):
    return types.SimpleNamespace(**{"eval_data": None, "data": {"kind": "text", "path": str(tmp_path)}, **kw})


def test_a_one_document_source_trains_without_validation_and_says_so(tmp_path, caplog):
    (tmp_path / "only.txt").write_text("one two three")
    note = train_data.validation_note(_tcfg(tmp_path))
    assert note == (f"no validation: text:{tmp_path} has 1 document(s), too few to hold one out; validation is "
                    f"skipped (set eval_data to evaluate)")
    (tmp_path / "second.txt").write_text("four five")
    with caplog.at_level(logging.WARNING):
        assert train_data.validation_note(_tcfg(tmp_path)) is None
    assert "selects none; holding out one document" in caplog.text
    val = document_source({"kind": "text", "path": str(tmp_path), "split": "validation"})
    train = document_source({"kind": "text", "path": str(tmp_path), "split": "train"})
    assert len(val) == len(train) == 1 and val.location(0) != train.location(0)  # held out, not shared


def test_validation_that_cannot_be_honest_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a b")
    with pytest.raises(UserError, match="split 'all' trains on every document, so there is no validation split"):
        train_data.validation_note(_tcfg(tmp_path, data={"kind": "text", "path": str(tmp_path), "split": "all"}))
    with pytest.raises(UserError, match=r"eval_data text:.*: no documents in split 'validation'"):
        train_data.validation_note(_tcfg(tmp_path, eval_data={"kind": "text", "path": str(tmp_path),
                                                              "split": "validation"}))
    # an eval pass over empty documents has no scored tokens at all (the loop refuses to report 0.0 for it)
    (tmp_path / "a.txt").write_text("")
    batches = list(make_eval_dataset({"kind": "text", "path": str(tmp_path), "split": "all"}, TOK, seq_len=4,
                                     batch_size=2, num_batches=2))
    assert sum(b["loss_mask"].sum() for b in batches) == 0


def test_tokenizer_file_missing_or_unreadable(tmp_path):
    with pytest.raises(UserError) as e:
        tk.load_tokenizer(tmp_path / "nope.model")
    assert one_line(e) == f"tokenizer {tmp_path / 'nope.model'}: no such file"
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"bad\.model: not a sentencepiece model"):
        tk.load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder has neither tokenizer.json nor tokenizer.model"):
        tk.load_tokenizer(tmp_path / "empty")
