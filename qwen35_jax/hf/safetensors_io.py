"""safetensors read through memory maps (every dtype the releases use, F8_E4M3 included, and any slice without
reading the rest) and written tensor by tensor from a plan of names, dtypes and shapes (never the whole model in
memory). The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
padded with spaces to 8 bytes, then the raw little-endian data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen35_jax.hf.common import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20


class SafetensorsFile:
    """Header of one file; `array(name)` is a read-only memory map of one tensor (slicing reads only the slice)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > MAX_HEADER:
                    raise ValueError(f"header length {n}")
                header = json.loads(fh.read(n))
            size = self.path.stat().st_size
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {}
            for name, e in header.items():
                start, end = e["data_offsets"]
                if e["dtype"] not in DTYPES:
                    raise ValueError(f"tensor {name!r} has dtype {e['dtype']}")
                if 8 + n + end > size:
                    raise ValueError(f"tensor {name!r} runs past the end of the file")
                self.entries[name] = (e["dtype"], tuple(e["shape"]), 8 + n + start, end - start)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def keys(self):
        return list(self.entries)

    def dtype(self, name) -> str:
        return self.entries[name][0]

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def array(self, name) -> np.ndarray:
        dtype, shape, offset, nbytes = self.entries[name]
        if nbytes == 0:
            return np.zeros(shape, DTYPES[dtype])
        return np.memmap(self.path, DTYPES[dtype], "r", offset, shape)


def plan_shards(plan, max_shard_bytes: int) -> list[list]:
    """Splits [(name, dtype, shape)] into consecutive shards of at most `max_shard_bytes` (one tensor may exceed)."""
    shards, current, size = [], [], 0
    for item in plan:
        nbytes = int(np.prod(item[2], dtype=np.int64)) * np.dtype(item[1]).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_file(path, plan, produce, metadata=None) -> int:
    """Writes one file: `plan` [(name, numpy dtype, shape)], `produce(name)` the array for each, called in plan
    order and dropped once written. Returns the data bytes written."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, dtype, shape in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in plan:
            a = np.ascontiguousarray(produce(name))
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced {a.dtype}{a.shape}, planned {np.dtype(dtype)}{shape}")
            fh.write(a.tobytes() if a.dtype.byteorder != ">" else a.astype(a.dtype.newbyteorder("<")).tobytes())
    return offset


def write_folder(path, plan, produce, max_shard_bytes: int, metadata=None) -> list[str]:
    """`model.safetensors`, or numbered shards plus `model.safetensors.index.json` when the plan exceeds one shard."""
    path = Path(path)
    shards = plan_shards(plan, max_shard_bytes)
    if len(shards) <= 1:
        write_file(path / "model.safetensors", shards[0] if shards else [], produce, metadata)
        return ["model.safetensors"]
    weight_map, total, files = {}, 0, []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_file(path / fname, shard, produce, metadata)
        weight_map.update({name: fname for name, _, _ in shard})
        files.append(fname)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


class FolderReader:
    """Tensor-by-tensor access to a folder's safetensors: one file, several, or a sharded index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        self._files = {}
        if index.exists():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            self.weight_map = {}
            for file in files:
                self.weight_map.update({k: file.name for k in self._file(file.name).keys()})

    def _file(self, fname) -> SafetensorsFile:
        if fname not in self._files:
            file = self.path / fname
            if not file.exists():
                raise CheckpointError(f"{file}: shard named by the index is missing")
            self._files[fname] = SafetensorsFile(file)
        return self._files[fname]

    def names(self):
        return list(self.weight_map)

    def __contains__(self, name):
        return name in self.weight_map

    def entry(self, name) -> tuple[SafetensorsFile, str]:
        f = self._file(self.weight_map[name])
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: tensor {name!r} named by the index is not in this shard")
        return f, name

    def shape(self, name) -> tuple:
        f, n = self.entry(name)
        return f.shape(n)

    def dtype(self, name) -> str:
        f, n = self.entry(name)
        return f.dtype(n)

    def array(self, name) -> np.ndarray:
        f, n = self.entry(name)
        return f.array(n)
