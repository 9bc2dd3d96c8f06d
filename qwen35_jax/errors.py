"""User-facing errors: bad input becomes one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """Anything the user can fix: a bad config, malformed data, a mismatched checkpoint."""


def user_error_types() -> tuple:
    from qwen35_jax.config import ConfigError
    from qwen35_jax.hf import CheckpointError

    return (UserError, ConfigError, CheckpointError, FileNotFoundError)


def run_cli(fn) -> int:
    try:
        result = fn()
    except user_error_types() as e:
        if os.environ.get("QWEN35_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
