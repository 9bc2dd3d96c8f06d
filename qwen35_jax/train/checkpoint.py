"""Orbax checkpoints of the training state, the data iterator state and run metadata, local or on `gs://`.

Saves are asynchronous; the newest `keep` are kept. `restore_latest` walks from the newest step backwards:

- a changed state structure (optimizer, model) is reported with the differing keys: `CheckpointStructureError`,
  nothing moved;
- a transient read error (connection, timeout, UNAVAILABLE, ...) is retried `RETRIES` times with a growing pause,
  each retry logged; if it persists the run stops (`CheckpointReadError`), nothing moved: never called corruption;
- anything else is a corrupt or partial checkpoint: one line, then the previous step is tried. A training run
  (not read-only) moves the unreadable steps to `checkpoints.corrupt/` once an older one restored;
- on many hosts process 0 checks the structure and broadcasts its verdict, every process restores its shards, the
  outcomes are gathered so that every process takes the same branch, and only process 0 moves anything.

`params_only=True` restores just `state["params"]` (no AdamW moments): what `generate`, `convert` and `eval` need.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen35_jax import paths
from qwen35_jax.errors import UserError

log = logging.getLogger(__name__)

OK, CORRUPT, TRANSIENT, STRUCTURE = 0, 1, 2, 3
# Status codes (gRPC/absl, as tensorstore and GCS report them) and exception types that mean "try again".
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "503 ", "429 ",
                   "Service Unavailable", "Too Many Requests", "Connection reset", "Timeout")


class CheckpointStructureError(UserError):
    """The checkpoint holds a differently shaped state than the run builds (changed optimizer or model)."""


class CheckpointReadError(UserError):
    """A checkpoint could not be read for a reason that is not corruption (a persistent I/O error)."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(code in text for code in TRANSIENT_CODES)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_shapes(tree) -> dict[str, tuple]:
    """'a/b/0/c' -> shape for every leaf (arrays, shape structs, orbax array metadata); the same names for a
    live state and for the metadata orbax saved of it (namedtuples and tuples both become names/indices)."""
    return {"/".join(_key(e) for e in p): tuple(getattr(x, "shape", ()) or ())
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def structure_difference(saved: dict, expected: dict, subset: bool = False) -> str | None:
    """None when `saved` holds what `expected` describes (all of it: `subset`), else a one-line description."""
    missing = sorted(set(expected) - set(saved))
    unexpected = [] if subset else sorted(set(saved) - set(expected))
    shapes = [k for k in expected if k in saved and saved[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:5])}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"not expected {', '.join(unexpected[:5])}"
                     + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    for k in shapes[:3]:
        parts.append(f"{k} has shape {saved[k]}, expected {expected[k]}")
    return "; ".join(parts) or None


def _gather(code: int) -> list[int]:
    """Every process's code, on every process."""
    if jax.process_count() == 1:
        return [code]
    from jax.experimental import multihost_utils

    return [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)]


def _broadcast(code: int) -> int:
    """Process 0's code, on every process."""
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _with_shardings(abstract):
    """Leaves without a sharding get the first local device (a host-side restore, e.g. for generation)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


class Checkpointer:
    RETRIES = 3  # attempts at a transiently failing read
    RETRY_DELAY_S = 2.0  # first pause; doubled after each failure

    def __init__(self, directory, keep: int = 3, async_save: bool = True, read_only: bool = False):
        directory = paths.path(directory)
        self.directory = directory if paths.is_remote(directory) else directory.absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None = None, meta: dict | None = None) -> None:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    # ------------------------------------------------------------------------------------------------ restore

    def restore_latest(self, abstract, warn=print, params_only: bool = False):
        """(step, state, data_state, meta) from the newest restorable checkpoint, or None if there are none.

        `abstract` describes the state (ShapeDtypeStructs with shardings, see `abstract_like`), or with
        `params_only` just the parameters; then `state` is the parameters and data_state/meta are None."""
        steps = self.steps()
        bad = []
        for step in reversed(steps):
            where = self.directory / str(step)
            # 1. the structure, from the saved metadata: process 0 reads, everyone follows its verdict
            code, detail = OK, ""
            if jax.process_index() == 0:
                code, detail = self._check_structure(step, abstract, params_only)
            code = _broadcast(code)
            if code == STRUCTURE:
                raise CheckpointStructureError(
                    f"{where} holds a different {'parameter' if params_only else 'training-state'} structure "
                    f"than this run builds ({detail or 'see process 0'}); was the optimizer or model changed? "
                    f"Nothing was moved (use another run_dir, or init_from={self.directory.parent} for the weights)")
            if code == OK:
                # 2. the arrays: every process reads its own shards
                try:
                    restored = self._retrying(lambda: self._restore(step, abstract, params_only), where, warn)
                except Exception as e:  # orbax/tensorstore raise many types for truncated or corrupt files
                    code, detail = (TRANSIENT if is_transient(e) else CORRUPT), _one_line(e)
                codes = _gather(code)
                code = max(codes, key=lambda c: (c == TRANSIENT, c))  # a read failure anywhere wins
            if code == TRANSIENT:
                raise CheckpointReadError(f"{where}: could not be read after {self.RETRIES} tries "
                                          f"({detail or 'on another process'}); not treated as corruption, "
                                          f"nothing was moved; rerun when storage is reachable")
            if code == CORRUPT:
                warn(f"checkpoint {where} is corrupt or partial ({detail or 'on another process'}); "
                     f"trying the previous one")
                bad.append(step)
                continue
            if bad and not self.read_only:
                self._set_aside(bad, warn)
            return restored
        if steps:
            refuse = "" if self.read_only else ("; refusing to start from scratch over them (move the directory "
                                                "away to start a new run)")
            raise UserError(f"{self.directory}: none of the checkpoints {steps} can be restored{refuse}")
        return None

    def _retrying(self, fn, where, warn):
        delay = self.RETRY_DELAY_S
        for attempt in range(1, self.RETRIES + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e) or attempt == self.RETRIES:
                    raise
                msg = f"{where}: transient read error ({_one_line(e)}); retry {attempt}/{self.RETRIES - 1} in {delay:g}s"
                log.warning(msg)
                warn(msg)
                time.sleep(delay)
                delay *= 2

    def _check_structure(self, step: int, abstract, params_only: bool) -> tuple[int, str]:
        where = self.directory / str(step) / "state"
        try:
            tree = self._retrying(lambda: ocp.PyTreeCheckpointer().metadata(where).item_metadata.tree, where,
                                  lambda *_: None)
            saved = flat_shapes(tree["params"] if params_only else tree)
        except Exception as e:
            return (TRANSIENT if is_transient(e) else CORRUPT), _one_line(e)
        diff = structure_difference(saved, flat_shapes(abstract))
        return (STRUCTURE, diff) if diff else (OK, "")

    def _restore(self, step: int, abstract, params_only: bool):
        abstract = _with_shardings(abstract)
        if params_only:
            target = {"params": abstract}
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
                    target), partial_restore=True))
            return step, restored["params"], None, None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        data_state = None
        if (self.directory / str(step) / "data").exists():
            data_state = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        return step, restored["state"], data_state, restored["meta"]

    def _set_aside(self, steps: list[int], warn) -> None:
        """Move unreadable checkpoints out of the step directory (kept for inspection, never deleted), so that the
        resumed run can save those steps again. Every process has agreed on `steps`; process 0 alone moves."""
        aside = self.directory.parent / f"{self.directory.name}.corrupt"
        if jax.process_index() == 0:
            for step in steps:
                target = aside / f"{step}.{int(time.time())}"
                paths.move(self.directory / str(step), target)
                warn(f"moved the unreadable checkpoint {self.directory / str(step)} to {target}")
        _barrier("qwen35_checkpoint_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs (with shardings) describing `state`, for restoring."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def write_json(path, obj) -> None:
    """Atomically (see paths.write_text), local or remote."""
    paths.write_text(path, json.dumps(obj, indent=2, default=str))
