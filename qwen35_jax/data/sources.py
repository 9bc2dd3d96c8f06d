"""Data specs (plain dicts, e.g. from YAML) turned into random-access document sources.

Spec kinds (every kind also takes `split`: "train" (default), "validation" or "all", and `validation_fraction`,
default 0.02; documents go to validation by a stable hash of their file path and record number):

    {"kind": "stdlib"}                                        the running Python's standard library, one doc a file
    {"kind": "text", "path": "notes/", "glob": "**/*.txt"}    a text file or a folder; one document per file
    {"kind": "jsonl", "path": "d.jsonl", "field": "text"}     a file or folder (glob "**/*.jsonl"); one doc a line
    {"kind": "array_record", "path": "d/", "tokenized": False}  files (glob "**/*.array_record*"); one doc a record

ArrayRecord records are utf-8 text, or with `tokenized: true` a document's token ids as little-endian int32 bytes
(no bos/eos: the pipeline adds them as it does for text). Malformed data raises `UserError` naming the file and
the line (JSONL, text) or record (ArrayRecord). Files are read lazily, so such errors come when a document is
first read.
"""

from __future__ import annotations

import json
import logging
import posixpath

import numpy as np
import yaml

from qwen35_jax import paths
from qwen35_jax.data import corpus
from qwen35_jax.errors import UserError

KINDS = {
    "stdlib": {"root"},
    "text": {"path", "glob"},
    "jsonl": {"path", "glob", "field"},
    "array_record": {"path", "glob", "tokenized"},
}
COMMON_KEYS = {"kind", "split", "validation_fraction"}
DEFAULT_GLOBS = {"text": "**/*.txt", "jsonl": "**/*.jsonl", "array_record": "**/*.array_record*"}
log = logging.getLogger(__name__)


def parse_spec(arg: str | dict) -> dict:
    """A spec from a dict, 'stdlib', a path (.jsonl, .array_record*, anything else is text), or inline YAML."""
    if isinstance(arg, dict):
        return dict(arg)
    text = str(arg).strip()
    if text == "stdlib":
        return {"kind": "stdlib"}
    if text.startswith("{"):
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"data spec {text!r} is not valid YAML: {e}") from None
        if not isinstance(spec, dict):
            raise UserError(f"data spec {text!r} must be a mapping")
        return spec
    name = posixpath.basename(text)
    if name.endswith(".jsonl"):
        return {"kind": "jsonl", "path": text}
    if ".array_record" in name:
        return {"kind": "array_record", "path": text}
    return {"kind": "text", "path": text}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stable, well-spread 64-bit hash of integers, vectorised."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class DocumentSource:
    """Random access to the documents of one spec (grain's data source protocol: `len` and `[i]`).

    `source[i]` is a `str`, or an int32 array of token ids when `tokenized`. `files` are the matched files in
    sorted order; document i is record `records[i]` of file `files[file_ids[i]]`.
    """

    def __init__(self, spec: dict):
        self.spec = validate_spec(spec)
        self.kind = self.spec["kind"]
        self.name = f"{self.kind}:{self.spec.get('path', 'stdlib')}"
        self.tokenized = bool(self.spec.get("tokenized", False))
        self.root, self.files = _find_files(self.spec)
        self._readers: dict[int, object] = {}
        counts, self._offsets, self._lines = [], [], []
        for f in self.files:
            if self.kind == "jsonl":
                offsets, lines = _line_index(self.root / f)
                self._offsets.append(offsets)
                self._lines.append(lines)
                counts.append(len(lines))
            elif self.kind == "array_record":
                counts.append(self._reader(len(counts)).num_records())
            else:
                counts.append(1)
        file_ids = np.repeat(np.arange(len(self.files), dtype=np.int64), counts)
        records = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if counts else file_ids
        file_hashes = np.array([corpus.key_hash(f) for f in self.files], np.uint64)
        hashes = _mix64(file_hashes[file_ids] + records.astype(np.uint64)) if len(file_ids) else file_ids
        if self.kind in ("stdlib", "text"):  # one document per file: the file's own hash, as in corpus.py
            hashes = file_hashes[file_ids]
        split = self.spec.get("split", "train")
        fraction = float(self.spec.get("validation_fraction", corpus.VALIDATION_FRACTION))
        keep = corpus.split_mask(hashes, split, fraction)
        self.file_ids, self.records = file_ids[keep], records[keep]
        self.total_documents = len(file_ids)
        if split == "validation" and len(hashes) >= 2 and not (hashes < np.uint64(int(fraction * 2.0**64 - 1))).any():
            log.warning("%s: validation_fraction=%g of %d documents selects none; holding out one document (%s) "
                        "for validation", self.name, fraction, len(hashes), self.location(0))
        self.vocab_size: int | None = None  # set by the pipeline: token ids read from tokenized data are checked

    def __len__(self) -> int:
        return len(self.file_ids)

    def __getitem__(self, i: int):
        f, r = int(self.file_ids[i]), int(self.records[i])
        if self.kind == "stdlib":
            return corpus.read_stdlib_file(self.files[f], self.root)
        if self.kind == "text":
            return _decode(self.root / self.files[f], (self.root / self.files[f]).read_bytes(), 1)
        if self.kind == "jsonl":
            return self._jsonl_record(f, r)
        return self._array_record(f, r)

    def location(self, i: int) -> str:
        """'file:line' (JSONL), 'file#record' (ArrayRecord) or 'file' of document i, for messages."""
        f, r = int(self.file_ids[i]), int(self.records[i])
        path = self.root / self.files[f]
        if self.kind == "jsonl":
            return f"{path}:{self._lines[f][r]}"
        return f"{path}#{r}" if self.kind == "array_record" else str(path)

    def _jsonl_record(self, f: int, r: int) -> str:
        path, line = self.root / self.files[f], int(self._lines[f][r])
        with path.open("rb") as fh:
            fh.seek(int(self._offsets[f][r]))
            raw = fh.readline()
        text = _decode(path, raw, line)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line}: bad JSON ({e.msg} at column {e.colno})") from None
        field = self.spec.get("field", "text")
        if not isinstance(obj, dict) or field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{path}:{line}: no field {field!r} (has: {keys})")
        if not isinstance(obj[field], str):
            raise UserError(f"{path}:{line}: field {field!r} is a {type(obj[field]).__name__}, not a string")
        return obj[field]

    def _reader(self, f: int):
        if f not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            path = self.root / self.files[f]
            try:  # ArrayRecord reads local files only: remote shards are staged to local disk once per host
                self._readers[f] = ArrayRecordReader(paths.local_file(path), "readahead_buffer_size:0")
            except Exception as e:
                raise UserError(f"{path}: not a readable ArrayRecord file ({e})") from None
        return self._readers[f]

    def _array_record(self, f: int, r: int):
        path = self.root / self.files[f]
        raw = self._reader(f).read([r])[0]
        if not self.tokenized:
            return _decode(path, raw, None, record=r)
        if len(raw) % 4:
            raise UserError(f"{path}#{r}: {len(raw)} bytes is not a whole number of int32 token ids")
        ids = np.frombuffer(raw, "<i4").astype(np.int32)
        if self.vocab_size is not None and ids.size:
            bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
            if bad.size:
                raise UserError(f"{path}#{r}: token id {int(ids[bad[0]])} at position {int(bad[0])} is outside the "
                                f"vocabulary [0, {self.vocab_size}) ({bad.size} such ids in this record); "
                                f"was the data tokenized for another model?")
        return ids

    def __getstate__(self):  # open readers cannot cross into worker processes; they reopen on demand
        return {**self.__dict__, "_readers": {}}


def validate_spec(spec) -> dict:
    if not isinstance(spec, dict):
        raise UserError(f"data spec must be a mapping, got {spec!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise UserError(f"data spec {spec}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = set(spec) - KINDS[kind] - COMMON_KEYS
    if unknown:
        raise UserError(f"data spec {spec}: unknown key(s) {', '.join(sorted(unknown))} for kind {kind!r} "
                        f"(allowed: {', '.join(sorted(KINDS[kind] | COMMON_KEYS))})")
    if kind != "stdlib" and not spec.get("path"):
        raise UserError(f"data spec {spec}: kind {kind!r} needs a 'path'")
    if spec.get("split", "train") not in ("train", "validation", "all"):
        raise UserError(f"data spec {spec}: split must be train, validation or all, got {spec['split']!r}")
    fraction = spec.get("validation_fraction", corpus.VALIDATION_FRACTION)
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise UserError(f"data spec {spec}: validation_fraction must be a number in [0, 1), got {fraction!r}")
    return dict(spec)


def _find_files(spec: dict):
    """(root, files relative to root). `path` is a file, a folder (files matching `glob` under it) or itself a
    pattern (`gs://bucket/train/*.array_record`, `data/**/*.jsonl`); local or gs://."""
    if spec["kind"] == "stdlib":
        root = paths.path(spec["root"]) if spec.get("root") else corpus.stdlib_root()
        return root, corpus.stdlib_files(root)
    text = str(spec["path"])
    if paths.has_glob(text):
        if "glob" in spec:
            raise UserError(f"data spec {spec}: 'path' is already a pattern; drop 'glob' or make 'path' a folder")
        root_text, pattern = paths.split_glob(text)
        root = paths.path(root_text)
    else:
        root, pattern = paths.path(text), spec.get("glob", DEFAULT_GLOBS[spec["kind"]])
        if root.is_file():
            return root.parent, [root.name]
        if not root.is_dir():
            raise UserError(f"data spec {spec}: {root} does not exist")
    prefix = str(root).rstrip("/") + "/"
    files = [str(p)[len(prefix):] for p in paths.glob(prefix + pattern, files_only=True)]
    if not files:
        raise UserError(f"data spec {spec}: no files match {pattern!r} under {root}")
    return root, files


def _line_index(path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of a file."""
    data = np.fromfile(str(path), np.uint8) if not paths.is_remote(path) else np.frombuffer(path.read_bytes(), np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    ends = np.concatenate([ends, [len(data)]]).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts
    # Whitespace-only lines are short; checking only those keeps the scan vectorised.
    for i in np.flatnonzero(keep & (ends - starts <= 16)):
        keep[i] = bool(bytes(data[starts[i]:ends[i]]).strip())
    return starts[keep], lines[keep]


def _decode(path, raw: bytes, first_line: int | None, record: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = None if record is not None else first_line + raw[: e.start].count(b"\n")
        where = f"{path}#{record}" if record is not None else f"{path}:{line}"
        raise UserError(f"{where}: not valid utf-8 (byte {raw[e.start]:#04x})") from None


def document_source(spec: dict | str) -> DocumentSource:
    """The documents of a spec (or of anything `parse_spec` accepts)."""
    return DocumentSource(parse_spec(spec))
