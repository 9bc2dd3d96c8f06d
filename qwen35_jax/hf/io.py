"""`load(path) -> (cfg, params)` and `save(cfg, params, path)`: a folder of config.json plus safetensors.

Both walk `layout.tensor_specs`. Loading places every parameter leaf straight onto its sharding (a mesh or the
default device) from memory-mapped tensors; a stacked leaf larger than `stream_bytes` is assembled on device one
layer group at a time, so host memory stays bounded by one group's tensors rather than the model. Saving streams
tensor by tensor from (possibly sharded) arrays, one leaf group on host at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import OrderedDict, defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.hf import fp8
from qwen35_jax.hf.common import CheckpointError, dtype_name, np_dtype
from qwen35_jax.hf.config import config_from_hf, config_to_hf
from qwen35_jax.hf.layout import EXTENSIONS, LAYOUTS, Layout, detect_layout, resolve_layout, tensor_specs
from qwen35_jax.hf.safetensors_io import FolderReader, write_folder
from qwen35_jax.model import init_params

IGNORED_PREFIXES = ("model.visual.",)  # unless a registered spec group describes them
STREAM_BYTES = 256 * 2 ** 20


class _Discard:
    def __setitem__(self, key, value):
        pass


class _GroupView:
    """Writes addressed to group g of a stacked leaf land in the one-group buffer."""

    def __init__(self, buf, g):
        self.buf, self.g = buf, g

    def __setitem__(self, key, value):
        key = key if isinstance(key, tuple) else (key,)
        if key[0] != self.g:
            return
        self.buf[key[1:]] = value


class _Sink(dict):
    def __missing__(self, key):
        return _Discard()


def _key(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def _read(reader, name, spec, block, where):
    a = reader.array(name)
    if tuple(a.shape) != tuple(spec.shape):
        raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(a.shape)}, config expects "
                              f"{tuple(spec.shape)}")
    scale = name + fp8.SCALE_SUFFIX
    is_fp8 = reader.dtype(name).startswith("F8")
    if is_fp8 != (scale in reader):
        raise CheckpointError(f"{where}: tensor {name!r} is {reader.dtype(name)} "
                              + ("without its scale tensor " if is_fp8 else "but has a scale tensor ") + repr(scale))
    if is_fp8:
        return fp8.dequantize(a, reader.array(scale), block, name)
    return a


@functools.lru_cache(maxsize=None)
def _group_setter(sharding):
    return jax.jit(lambda a, x, g: jax.lax.dynamic_update_index_in_dim(a, x, g, 0), donate_argnums=0,
                   out_shardings=sharding)


def _sub_sharding(sharding):
    """The sharding of one group (leading axis dropped) of a stacked leaf."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _place(host, sharding):
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load(path, dtype="float32", compute_dtype=None, *, mesh=None, shardings=None,
         stream_bytes: int = STREAM_BYTES) -> tuple:
    """(cfg, params) from a Hugging Face checkpoint folder.

    `dtype` (a name or a numpy/JAX dtype): the parameters' dtype (FP8 weights are dequantized to it);
    `compute_dtype`: the compute dtype (default `dtype`). `mesh`: place each leaf with
    `sharding.param_shardings(cfg, mesh)`, or give `shardings` (a pytree like the params);
    neither: the default device. Expert layouts are detected per MoE block.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        cfg_dict = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = config_from_hf(cfg_dict, dtype=dtype, compute_dtype=compute_dtype, where=str(cfg_file))
    reader = FolderReader(path)
    names = reader.names()
    has_mtp = any(n.startswith("mtp.") for n in names)
    if has_mtp != bool(cfg.mtp_num_layers):  # trust the tensors: stripped checkpoints drop the MTP head
        cfg = cfg.replace(mtp_num_layers=1 if has_mtp else 0)
    for ext in EXTENSIONS:
        cfg = cfg.replace(**ext.config_from_hf(cfg_dict, names))
    specs = tensor_specs(cfg, detect_layout(names), names)
    missing = [n for n in specs if n not in reader]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} (expected shape {specs[missing[0]].shape})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    scales = {n for n in names if n.endswith(fp8.SCALE_SUFFIX) and n[:-len(fp8.SCALE_SUFFIX)] in specs}
    unexpected = [n for n in names if n not in specs and n not in scales and not n.startswith(IGNORED_PREFIXES)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} with shape {reader.shape(unexpected[0])}"
                              f" for config {cfg.family} ({len(unexpected)} unexpected in all)")
    block = fp8.block_size(cfg_dict) if scales else None
    target = np_dtype(dtype)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    if shardings is None and mesh is not None:
        from qwen35_jax.sharding import param_shardings

        shardings = param_shardings(cfg, mesh)
    flat_shard = {} if shardings is None else {_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    writers = defaultdict(list)  # leaf path -> [(group, tensor name)]
    for name, spec in specs.items():
        for leaf_path, g in spec.targets:
            writers[leaf_path].append((g, name))

    def fill(sink, todo):
        for name in todo:
            specs[name].put(sink, _read(reader, name, specs[name], block, path))

    out = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        key = _key(p)
        if key not in writers:
            raise CheckpointError(f"{path}: parameter {'/'.join(key)} is described by no checkpoint tensor")
        sharding = flat_shard.get(key, default)
        groups = sorted({g for g, _ in writers[key] if g is not None})
        nbytes = int(np.prod(leaf.shape)) * np.dtype(target).itemsize
        if groups and nbytes > stream_bytes:
            arr = jax.jit(lambda s=leaf.shape: jnp.zeros(s, target), out_shardings=sharding)()
            for g in groups:
                buf = np.zeros(leaf.shape[1:], target)
                fill(_Sink({key: _GroupView(buf, g)}), [n for gg, n in writers[key] if gg == g])
                arr = _group_setter(sharding)(arr, _place(buf, _sub_sharding(sharding)), g)
                del buf
        else:
            buf = np.zeros(leaf.shape, target)
            fill(_Sink({key: buf}), [n for _, n in writers[key]])
            arr = _place(buf, sharding)
            del buf
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = arr
    return cfg, out


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def save(cfg, params, path, *, layout="transformers", expert_layout: str | None = None, dtype=None,
         max_shard_bytes: int = 5 * 2 ** 30, extra_tensors: dict | None = None,
         vision_config: dict | None = None) -> None:
    """Writes config.json and safetensors shards (with an index when there are several) that transformers loads.

    `layout`: a name in `layout.LAYOUTS` ("transformers": per-expert tensors under `model.`, what transformers
    writes; "fused": fused experts; "release": the Qwen3.5 release layout, VL prefix, fused main experts, per-expert
    MTP experts; "release_packed": MTP experts fused too) or a `Layout`. `expert_layout` ("per_expert" / "fused")
    is the older spelling of the first two. Tensors are produced one at a time from `params` (host or sharded
    arrays); on several processes every process takes part and process 0 writes.
    """
    if expert_layout is not None:
        layout = Layout(expert_layout, expert_layout)
    layout = resolve_layout(layout)
    if getattr(cfg, "vision", None) is not None:  # a tower: the text weights sit under model.language_model.
        layout = dataclasses.replace(layout, vision_language=True)
    path = Path(path)
    target = np_dtype(dtype or cfg.param_dtype)
    specs = tensor_specs(cfg, layout)
    extra = dict(extra_tensors or {})
    plan = [(n, np.dtype(target), tuple(s.shape)) for n, s in specs.items()]
    plan += [(n, np.dtype(target), tuple(np.shape(a))) for n, a in extra.items()]
    cache: OrderedDict = OrderedDict()

    def leaf(leaf_path, g):
        k = (leaf_path, g)
        if k not in cache:
            x = params
            for part in leaf_path:
                x = x[part]
            cache[k] = _host(x if g is None else x[g])
            if len(cache) > 4:  # qkvz reads two leaves, per-expert specs alternate gate_up and down
                cache.popitem(last=False)
        return cache[k]

    def produce(name):
        a = specs[name].get(leaf) if name in specs else extra[name]
        return np.asarray(a).astype(target)

    if jax.process_index() != 0:
        for name, _, _ in plan:
            produce(name)
        return
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(cfg)
    for ext in EXTENSIONS:
        config = ext.config_to_hf(cfg, config)
    if layout.vision_language and "text_config" not in config:
        config = config_to_hf(cfg, vision_language=True, vision_config=vision_config)
    config["dtype"] = dtype_name(target)
    if "text_config" in config:
        config["text_config"]["dtype"] = config["dtype"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_folder(path, plan, produce, max_shard_bytes, metadata={"format": "pt"})


__all__ = ["load", "save", "LAYOUTS", "Layout"]
