"""Orbax checkpoints of the training state, the data iterator state and run metadata.

Saves are asynchronous; the newest `keep` are kept. Restoring walks from the newest step backwards: a corrupt or
partial checkpoint is reported and the previous one used; if none can be restored the run refuses to start over them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qwen35_jax.errors import UserError

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
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

    def restore_latest(self, abstract_state, warn=print):
        """(step, state, data_state, meta) from the newest restorable checkpoint, or None if there are none."""
        steps = self.steps()
        bad = []
        for step in reversed(steps):
            try:
                restored = (step,) + self.restore(step, abstract_state)
            except Exception as e:  # orbax/tensorstore raise many types for truncated or corrupt files
                first_line = (str(e).splitlines() or [""])[0][:200]
                warn(f"checkpoint {self.directory / str(step)} is corrupt or partial ({type(e).__name__}: "
                     f"{first_line}); trying the previous one")
                bad.append(step)
                continue
            if bad:
                self._set_aside(bad, warn)
            return restored
        if steps:
            raise UserError(f"{self.directory}: none of the checkpoints {steps} can be restored; refusing to start "
                            f"from scratch over them (move the directory away to start a new run)")
        return None

    def _set_aside(self, steps: list[int], warn) -> None:
        """Move unreadable checkpoints out of the step directory (kept for inspection, never deleted), so that the
        resumed run can save those steps again."""
        aside = self.directory.parent / f"{self.directory.name}.corrupt"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}.{int(time.time())}"
            shutil.move(str(self.directory / str(step)), target)
            warn(f"moved the unreadable checkpoint {self.directory / str(step)} to {target}")
        self.manager.reload()

    def restore(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        data_state = None
        if (self.directory / str(step) / "data").exists():
            data_state = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        return restored["state"], data_state, restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs (with shardings) describing `state`, for restoring."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    shutil.move(tmp, path)
