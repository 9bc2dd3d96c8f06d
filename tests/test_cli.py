"""The `qwen35` entry point: info, unknown commands, and bad input as one line without a traceback."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "qwen35_jax.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_lists_presets():
    out = run("info", "qwen3.5-397b-a17b")
    assert out.returncode == 0, out.stderr
    assert "396.35B params (16.33B active)" in out.stdout


def test_bad_override_is_one_line():
    out = run("info", "tiny", "hidden_sise=3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "did you mean 'hidden_size'" in out.stderr and "Traceback" not in out.stderr


def test_unknown_command():
    out = run("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr
