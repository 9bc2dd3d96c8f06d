"""The trainer's view of data: tokenizer from the config, resumable train iterator, eval batches, global arrays."""

from __future__ import annotations

import base64
import json

import jax
import numpy as np

from qwen35_jax import paths
from qwen35_jax.errors import UserError
from qwen35_jax.train.config import TrainConfig

BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                "loss_mask": np.float32}


def tokenizer_for(tcfg: TrainConfig):
    from qwen35_jax.data import tokenizer as tok

    spec = tcfg.tokenizer
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise UserError(f"tokenizer must be a mapping or a path, got {spec!r}")
    kind = spec.get("kind", "file")
    if kind == "stdlib":
        return tok.default_tokenizer(vocab_size=int(spec.get("vocab_size", 4096)))
    path = spec.get("path")
    if not path:
        raise UserError(f"tokenizer {spec}: needs a 'path' (a sentencepiece .model or a tokenizer.json)")
    return tok.load_tokenizer(path)


def _data_spec(spec):
    return {"kind": "text", "path": spec} if isinstance(spec, str) else dict(spec)


class TrainIterator:
    """Wraps the grain iterator: numpy batches, and a JSON-serialisable state for checkpoints."""

    def __init__(self, it):
        self.it = it

    def __next__(self) -> dict:
        batch = next(self.it)
        return {k: np.asarray(batch[k], BATCH_DTYPES[k]) for k in BATCH_DTYPES}

    def get_state_json(self) -> dict:
        state = self.it.get_state()
        if isinstance(state, bytes):
            return {"bytes_b64": base64.b64encode(state).decode()}
        return {"state": json.loads(json.dumps(state, default=_jsonable))}

    def set_state_json(self, d: dict) -> None:
        self.it.set_state(base64.b64decode(d["bytes_b64"]) if "bytes_b64" in d else d["state"])


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, bytes):
        return base64.b64encode(x).decode()
    raise TypeError(f"data iterator state holds a {type(x).__name__}, which cannot be checkpointed as JSON")


def train_iterator(tcfg: TrainConfig, tokenizer, data_state: dict | None) -> TrainIterator:
    """Global batches [batch_size, seq_len]. Every process builds the same stream (documents are not split by
    process), so a run's batches, and so its losses, do not depend on how many hosts feed it; `to_global` then
    places the rows each process's devices hold. The price: each host tokenises and packs the whole global batch."""
    from qwen35_jax.data.pipeline import make_dataset

    it = make_dataset(_data_spec(tcfg.data), tokenizer, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                      seed=tcfg.seed, shuffle=True, num_epochs=None, num_workers=tcfg.num_workers,
                      vocab_size=tcfg.model_config().vocab_size)
    wrapped = TrainIterator(it)
    if data_state is not None:
        wrapped.set_state_json(data_state)
    return wrapped


def _eval_spec(tcfg: TrainConfig) -> dict:
    return _data_spec(tcfg.eval_data if tcfg.eval_data is not None else {**_data_spec(tcfg.data),
                                                                          "split": "validation"})


def validation_note(tcfg: TrainConfig) -> str | None:
    """None when there is validation data, else why not (a one-document source has no validation split: the run
    trains without validation rather than report a made-up loss). An explicit `eval_data` without documents, or
    `data` with split 'all' (nothing held out) and no eval_data, is an error."""
    from qwen35_jax.data.sources import document_source

    if tcfg.eval_data is None and _data_spec(tcfg.data).get("split") == "all":
        raise UserError(f"data {tcfg.data}: split 'all' trains on every document, so there is no validation "
                        f"split; set eval_data, or split: train")
    source = document_source(_eval_spec(tcfg))
    if len(source):
        return None
    if tcfg.eval_data is not None:
        raise UserError(f"eval_data {source.name}: no documents in split {source.spec.get('split', 'train')!r}")
    return (f"no validation: {source.name} has {source.total_documents} document(s), too few to hold one out; "
            f"validation is skipped (set eval_data to evaluate)")


def eval_batches(tcfg: TrainConfig, tokenizer):
    """Global eval batches, the same on every process (like `train_iterator`)."""
    from qwen35_jax.data.pipeline import make_eval_dataset

    it = make_eval_dataset(_eval_spec(tcfg), tokenizer, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                           num_batches=tcfg.eval_batches, vocab_size=tcfg.model_config().vocab_size)
    for i, batch in enumerate(it):
        if i >= tcfg.eval_batches:
            break
        yield {k: np.asarray(batch[k], BATCH_DTYPES[k]) for k in BATCH_DTYPES}


def to_global(batch: dict, sharding) -> dict:
    """The global batch (identical on every process) -> global arrays laid out by `sharding`; each process copies
    in only the slices its own devices hold, whatever the mesh does with the batch dimension."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def load_init_params(path, model_cfg, shapes, shardings):
    """Start a run from a Hugging Face folder (config.json + safetensors) or orbax parameters (converted folder or a
    run directory); the tree and shapes must match the run's model."""
    path = paths.path(path)
    if (path / "config.json").exists() and paths.glob(f"{path}/*.safetensors*"):
        from qwen35_jax import hf

        loaded_cfg, params = hf.load(paths.local_dir(path), dtype=model_cfg.param_dtype)
        hf.check_same_model(model_cfg, loaded_cfg, path)  # names every differing field, not only shapes
    else:
        from qwen35_jax.train.convert import load_orbax_params

        params = load_orbax_params(path)
    check_param_shapes(params, shapes, str(path))
    return jax.device_put(jax.tree.map(lambda x, s: np.asarray(x, s.dtype), params, shapes), shardings)


def check_param_shapes(params, reference, where: str) -> None:
    """Same tree and shapes as `reference` (arrays, shape structs or shardings with shapes), else a named error."""
    ref = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(reference)}
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for k in ref:
        if k not in got:
            raise UserError(f"{where}: missing parameter {k}")
    for k, x in got.items():
        if k not in ref:
            raise UserError(f"{where}: unexpected parameter {k} with shape {tuple(x.shape)}")
        if hasattr(ref[k], "shape") and tuple(ref[k].shape) != tuple(x.shape):
            raise UserError(f"{where}: parameter {k} has shape {tuple(x.shape)}, the model expects "
                            f"{tuple(ref[k].shape)}")
