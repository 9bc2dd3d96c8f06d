"""The benchmark helpers (issue 14): the machine-state guard (a loaded machine is refused or its results marked) and
the page faults each timed call records."""

import argparse
import ctypes
import mmap
import sys

import pytest

from benchmarks.common import add_load_arguments, interleaved, load_guard, load_line


def test_benchmark_load_guard_refuses_a_loaded_machine_and_marks_allowed_runs():
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    with pytest.raises(SystemExit, match="load average .* is above .* --allow-load"):
        load_guard(parser.parse_args(["--max-load", "-1"]))  # any load is above a negative limit
    guard = load_guard(parser.parse_args(["--max-load", "-1", "--allow-load"]))
    assert guard["loaded"] and "LOADED" in load_line(guard)
    idle = load_guard(parser.parse_args(["--max-load", "1e9"]))
    assert not idle["loaded"] and "idle" in load_line(idle) and idle["threads"]["cores"] == len(idle["cores"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor page fault counts are read from getrusage")
def test_timed_calls_count_the_page_faults_of_fresh_memory():
    """Touching 64 MiB of freshly mapped memory faults once per 4 KiB page (huge pages refused, as an allocator's
    mmap'd block gets them only when asked); touching a kept mapping does not fault again."""
    size = 64 << 20

    def touch(m):
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(m)), 1, size)

    def fresh():
        m = mmap.mmap(-1, size)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        touch(m)
        m.close()

    kept = mmap.mmap(-1, size)
    r = interleaved({"fresh": fresh, "reuse": lambda: touch(kept)}, warmup=1, steps=3)
    kept.close()
    pages = size // 4096
    assert min(r["fresh"]["page_faults"]) >= pages * 0.9, r["fresh"]["page_faults"]
    assert r["reuse"]["median_page_faults"] < pages // 10, r["reuse"]["page_faults"]
