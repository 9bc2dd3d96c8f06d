"""The embedded stdlib corpus: which files, and a stable train/validation split by file."""

import numpy as np

from qwen35_jax.data import corpus


def test_stdlib_listing_is_sorted_and_excludes_tests_and_site_packages():
    files = corpus.stdlib_files()
    assert files == sorted(files) and len(files) > 300
    assert all(f.endswith(".py") for f in files)
    for banned in ("site-packages", "test", "tests", "idle_test"):
        assert not any(banned in f.split("/")[:-1] for f in files), banned
    assert "argparse.py" in files and "json/decoder.py" in files
    assert "encodings/cp1252.py" not in files  # a generated codec table
    size = sum((corpus.stdlib_root() / f).stat().st_size for f in files)
    assert size > 5e6


def test_split_by_file_is_disjoint_stable_and_about_two_percent():
    train, val = corpus.stdlib_split("train"), corpus.stdlib_split("validation")
    assert set(train).isdisjoint(val) and sorted(train + val) == corpus.stdlib_files()
    assert 0 < len(val) < 0.06 * len(train)
    assert corpus.stdlib_split("validation") == val
    assert corpus.key_hash("argparse.py") == corpus.key_hash("argparse.py")  # not Python's salted hash


def test_split_mask_small_sources_still_hold_one_document_out():
    hashes = np.array([corpus.key_hash(f"f{i}") for i in range(3)], np.uint64)
    val, train = corpus.split_mask(hashes, "validation"), corpus.split_mask(hashes, "train")
    assert val.sum() == 1 and (val ^ train).all()
    assert corpus.split_mask(hashes[:1], "validation").sum() == 0
    assert corpus.split_mask(hashes, "all").all()


def test_stdlib_documents_are_text():
    first = next(corpus.stdlib_documents("validation"))
    assert isinstance(first, str) and first
