"""Data specs: text, JSONL and ArrayRecord sources, splits, and errors that name the file and line."""

import json

import numpy as np
import pytest

from qwen35_jax.data.sources import document_source, parse_spec
from qwen35_jax.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parse_spec():
    assert parse_spec("stdlib") == {"kind": "stdlib"}
    assert parse_spec("a/b.jsonl") == {"kind": "jsonl", "path": "a/b.jsonl"}
    assert parse_spec("d/x.array_record-00000-of-00002")["kind"] == "array_record"
    assert parse_spec("notes/") == {"kind": "text", "path": "notes/"}
    assert parse_spec("{kind: jsonl, path: x.jsonl, field: body}")["field"] == "body"


@pytest.mark.parametrize("spec, message", [
    ({"kind": "csv", "path": "x"}, "kind must be one of"),
    ({"kind": "text"}, "needs a 'path'"),
    ({"kind": "text", "path": "x", "feild": "t"}, "unknown key"),
    ({"kind": "text", "path": "/no/such/dir"}, "does not exist"),
    ({"kind": "stdlib", "split": "test"}, "split must be"),
    ({"kind": "stdlib", "validation_fraction": 2}, "validation_fraction"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        document_source(spec)


def test_text_folder_one_document_per_file_and_splits(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_text(f"document {i}\n")
    (tmp_path / "skip.md").write_text("not matched")
    every = document_source({"kind": "text", "path": str(tmp_path), "split": "all"})
    assert sorted(every[i] for i in range(len(every))) == sorted(f"document {i}\n" for i in range(30))
    train = document_source({"kind": "text", "path": str(tmp_path)})  # split defaults to train
    val = document_source({"kind": "text", "path": str(tmp_path), "split": "validation"})
    assert len(val) >= 1 and len(train) + len(val) == 30
    assert {train[i] for i in range(len(train))}.isdisjoint(val[i] for i in range(len(val)))
    single = document_source({"kind": "text", "path": str(tmp_path / "03.txt"), "split": "all"})
    assert len(single) == 1 and single[0] == "document 3\n"


def test_text_non_utf8_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    src = document_source({"kind": "text", "path": str(tmp_path), "split": "all"})
    with pytest.raises(UserError, match=r"bad\.txt:3: not valid utf-8"):
        src[0]


def test_jsonl_records_blank_lines_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "one"}, "", "   ", {"body": "two", "x": 1}, {"body": "é"}])
    src = document_source({"kind": "jsonl", "path": str(path), "field": "body", "split": "all"})
    assert [src[i] for i in range(len(src))] == ["one", "two", "é"]
    assert src.location(1).endswith("d.jsonl:4")


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', r"d\.jsonl:3: bad JSON"),
    ('{"other": "x"}', r"d\.jsonl:3: no field 'text' \(has: other\)"),
    ('{"text": 7}', r"d\.jsonl:3: field 'text' is a int"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, bad_line, {"text": "d"}])
    src = document_source({"kind": "jsonl", "path": str(tmp_path), "split": "all"})
    assert src[1] == "b"
    with pytest.raises(UserError, match=message):
        src[2]


def test_array_record_text_and_tokenized(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for s in ["alpha", "beta", "ünï"]:
        w.write(s.encode())
    w.close()
    w = ArrayRecordWriter(str(tmp_path / "ids.array_record"), "group_size:1")
    for ids in ([5, 6, 7], [70000]):
        w.write(np.array(ids, "<i4").tobytes())
    w.write(b"\x01\x02\x03")
    w.close()

    text = document_source({"kind": "array_record", "path": str(tmp_path / "t.array_record"), "split": "all"})
    assert [text[i] for i in range(len(text))] == ["alpha", "beta", "ünï"]
    ids = document_source({"kind": "array_record", "path": str(tmp_path / "ids.array_record"), "split": "all",
                           "tokenized": True})
    assert ids.tokenized and ids[0].dtype == np.int32 and ids[0].tolist() == [5, 6, 7] and ids[1].tolist() == [70000]
    with pytest.raises(UserError, match=r"ids\.array_record#2: 3 bytes"):
        ids[2]
