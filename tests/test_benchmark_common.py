"""The benchmark helpers' machine-state guard (issue 14): a loaded machine is refused or its results marked."""

import argparse

import pytest

from benchmarks.common import add_load_arguments, load_guard, load_line


def test_benchmark_load_guard_refuses_a_loaded_machine_and_marks_allowed_runs():
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    with pytest.raises(SystemExit, match="load average .* is above .* --allow-load"):
        load_guard(parser.parse_args(["--max-load", "-1"]))  # any load is above a negative limit
    guard = load_guard(parser.parse_args(["--max-load", "-1", "--allow-load"]))
    assert guard["loaded"] and "LOADED" in load_line(guard)
    idle = load_guard(parser.parse_args(["--max-load", "1e9"]))
    assert not idle["loaded"] and "idle" in load_line(idle) and idle["threads"]["cores"] == len(idle["cores"])
