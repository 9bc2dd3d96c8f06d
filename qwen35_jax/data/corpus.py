"""The embedded default corpus: the source of the running Python's standard library, present on every machine.

Documents are whole `.py` files (code and docstrings; not test suites, not generated codec tables), split into train and validation by a stable hash of the
file's path relative to the stdlib root, so the split is the same on every machine with the same Python.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

VALIDATION_FRACTION = 0.02

# Path components that mark test suites and test data (lib2to3's test data lives under lib2to3/tests/data).
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _included(rel: str) -> bool:
    parts = rel.split("/")
    if _EXCLUDED_PARTS.intersection(parts[:-1]):
        return False
    # Build-machine specific files (paths, compiler flags) would make the corpus differ between installs.
    return not (parts[0].startswith("config-") or parts[-1].startswith("_sysconfigdata"))


def _generated_codec(path: Path) -> bool:
    # encodings/cp1252.py and friends are machine-generated tables of hex codes: noise for a language model.
    with open(path, "rb") as f:
        return f.read(64).startswith(b'""" Python Character Mapping Codec')


@functools.lru_cache(maxsize=4)
def _listing(root: Path) -> tuple[str, ...]:
    rels = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_PARTS]  # prune: site-packages and test trees are big
        rel_folder = Path(folder).relative_to(root).as_posix()
        rels += [n if rel_folder == "." else f"{rel_folder}/{n}" for n in names if n.endswith(".py")]
    rels.sort()
    return tuple(r for r in rels if _included(r) and not (r.startswith("encodings/") and _generated_codec(root / r)))


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths (posix) of the stdlib `.py` files in the corpus."""
    return list(_listing(stdlib_root() if root is None else Path(root)))


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a document key (not Python's salted `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def split_mask(hashes: np.ndarray, split: str, fraction: float = VALIDATION_FRACTION) -> np.ndarray:
    """Boolean mask over documents with the given uint64 hashes for `split` in {"train", "validation", "all"}.

    A document is in validation when its hash falls in the lowest `fraction` of the 64-bit range. If that leaves
    validation empty while there are at least two documents, the document with the smallest hash is held out, so
    small sources still get a (tiny) validation split.
    """
    hashes = np.asarray(hashes, np.uint64)
    if split == "all":
        return np.ones(hashes.shape, bool)
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', got {split!r}")
    val = hashes < np.uint64(int(fraction * 2.0**64 - 1))
    if not val.any() and hashes.size >= 2:
        val[np.argmin(hashes)] = True
    return val if split == "validation" else ~val


def stdlib_split(split: str = "train", root: Path | None = None) -> list[str]:
    """Sorted relative paths of the stdlib files in `split`."""
    files = stdlib_files(root)
    mask = split_mask(np.array([key_hash(f) for f in files], np.uint64), split)
    return [f for f, m in zip(files, mask) if m]


def read_stdlib_file(rel: str, root: Path | None = None) -> str:
    # A few stdlib files carry non-utf-8 bytes in comments; replacing them beats dropping the file.
    return ((stdlib_root() if root is None else Path(root)) / rel).read_text(encoding="utf-8", errors="replace")


def stdlib_documents(split: str = "train", root: Path | None = None):
    """Yields the text of each stdlib file in `split`, in sorted path order."""
    for rel in stdlib_split(split, root):
        yield read_stdlib_file(rel, root)
