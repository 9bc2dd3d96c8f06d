"""Checkpoint hygiene without a model: a changed state structure is named and nothing moves; transient read errors
are retried, and when they persist the run stops without calling the checkpoint corrupt; a corrupt newest step
falls back to the previous one (moved aside by a training run, left in place by a read-only reader); parameters
alone restore without the optimizer state."""

import jax
import jax.numpy as jnp
import pytest

from qwen35_jax.errors import UserError
from qwen35_jax.train import checkpoint as ck


def state(scale=1.0):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(3) * scale},
            "opt_state": {"mu": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}, "step": jnp.int32(int(scale))}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setattr(ck.Checkpointer, "RETRY_DELAY_S", 0.0)
    directory = tmp_path / "checkpoints"
    c = ck.Checkpointer(directory, async_save=False)
    for step in (1, 2):
        c.save(step, state(step), {"epoch": step}, {"step": step})
    c.close()
    return directory


def listing(directory):
    return sorted(p.name for p in directory.parent.rglob("*") if p.parent in (directory, directory.parent))


def test_restores_the_newest(saved):
    c = ck.Checkpointer(saved)
    step, got, data, meta = c.restore_latest(abstract(state()))
    assert (step, data, meta) == (2, {"epoch": 2}, {"step": 2})
    assert (got["params"]["w"] == state(2)["params"]["w"]).all()


def test_changed_structure_names_the_keys_and_moves_nothing(saved):
    before = listing(saved)
    target = state()
    target["opt_state"]["nu"] = target["opt_state"]["mu"]
    del target["step"]
    with pytest.raises(ck.CheckpointStructureError, match=r"missing opt_state/nu/b, opt_state/nu/w; not expected "
                                                          r"step.*Nothing was moved"):
        ck.Checkpointer(saved).restore_latest(abstract(target))
    target = state()
    target["params"]["w"] = jnp.zeros((3, 3))
    with pytest.raises(ck.CheckpointStructureError, match=r"params/w has shape \(2, 3\), expected \(3, 3\)"):
        ck.Checkpointer(saved).restore_latest(abstract(target))
    assert listing(saved) == before


def test_transient_errors_are_retried_then_reported_never_called_corrupt(saved, monkeypatch):
    real, calls, warned = ck.Checkpointer._restore, [], []

    def flaky(self, step, target, params_only):
        calls.append(step)
        if len(calls) <= 2:
            raise ConnectionError("Connection reset by peer")
        return real(self, step, target, params_only)

    monkeypatch.setattr(ck.Checkpointer, "_restore", flaky)
    step, *_ = ck.Checkpointer(saved).restore_latest(abstract(state()), warn=warned.append)
    assert step == 2 and calls == [2, 2, 2]
    assert [w.split("; ")[-1] for w in warned] == ["retry 1/2 in 0s", "retry 2/2 in 0s"]

    before = listing(saved)
    monkeypatch.setattr(ck.Checkpointer, "_restore",
                        lambda *a: (_ for _ in ()).throw(OSError("UNAVAILABLE: GCS returned 503")))
    with pytest.raises(ck.CheckpointReadError, match=r"/2: could not be read after 3 tries.*not treated as "
                                                     r"corruption, nothing was moved"):
        ck.Checkpointer(saved).restore_latest(abstract(state()), warn=lambda *_: None)
    assert listing(saved) == before


def corrupt(directory, step, data_only=True):
    """Garbage in the array data (metadata intact: found by the restore) or in every file (found by the check)."""
    for f in (directory / str(step) / "state").rglob("*"):
        if f.is_file() and (not data_only or f.parent.name == "d"):
            f.write_bytes(b"garbage")


def test_corrupt_newest_falls_back_read_only_moves_nothing(saved):
    corrupt(saved, 2)
    warned = []
    reader = ck.Checkpointer(saved, read_only=True)
    step, params, _, _ = reader.restore_latest(abstract(state()["params"]), warn=warned.append, params_only=True)
    assert step == 1 and set(params) == {"b", "w"} and (params["w"] == state(1)["params"]["w"]).all()
    assert len(warned) == 1 and f"{saved}/2 is corrupt or partial" in warned[0] and "previous one" in warned[0]
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert not (saved.parent / "checkpoints.corrupt").exists()

    step, *_ = ck.Checkpointer(saved).restore_latest(abstract(state()), warn=warned.append)
    assert step == 1 and "moved the unreadable checkpoint" in warned[-1]
    assert [p.name.split(".")[0] for p in (saved.parent / "checkpoints.corrupt").iterdir()] == ["2"]


def test_all_unreadable_is_an_error(saved):
    corrupt(saved, 1, data_only=False)
    corrupt(saved, 2)
    with pytest.raises(UserError, match=r"none of the checkpoints \[1, 2\] can be restored; refusing"):
        ck.Checkpointer(saved).restore_latest(abstract(state()), warn=lambda *_: None)
