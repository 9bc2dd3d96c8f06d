"""The only place that knows about meshes: mesh construction, logical axis rules, parameter and batch shardings.

Modules name logical axes (`batch`, `seq`, `embed`, `mlp`, `heads`, `vocab`, `expert`); the rules below map them to
the mesh axes `data`, `fsdp`, `tensor`, `expert` and `sequence` (context parallelism: `seq` over `sequence`).
Parameter axes are inferred from parameter names and shapes, so the model code stays free of sharding annotations.
A dimension that a mesh axis does not divide is replicated instead (tiny models on many devices still run).
Computations XLA cannot partition run per device under `shard_map`: Pallas kernels (`shard_kernel`) and the
expert-parallel MoE dispatch (`shard_experts`: tokens over the batch axes, experts over `expert`), and the mixers
under context parallelism (`shard_sequence`: each device holds a contiguous slice of every sequence and the mixer
exchanges what crosses slices over the axis it is handed).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

# logical axis -> mesh axes (in order); None = replicated
DEFAULT_RULES = {
    "batch": ("data", "fsdp", "expert"),
    "tokens": ("data", "fsdp", "expert", "sequence"),  # a flattened [batch * seq] axis
    "seq": ("sequence",),
    "embed": ("fsdp", "sequence"),  # parameters: the devices of a sequence group also shard the weights (ZeRO-3)
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "layers": None,
}

_ACTIVE: list[tuple[Mesh, dict]] = []


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with sizes per axis; one axis may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = {k: int(v) for k, v in (shape or {}).items()}
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} is not one of {MESH_AXES}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    if "data" not in shape and all(v != -1 for v in sizes.values()):
        sizes["data"] = -1
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {rest}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh([sizes[a] for a in MESH_AXES], devices=devices)
    except Exception:  # CPU / topology descriptions without a physical layout
        grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None) -> P:
    """PartitionSpec for logical axes, replicating a dimension that its mesh axes do not divide."""
    rules = DEFAULT_RULES if rules is None else rules
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_logical_axes(path: tuple[str, ...], shape: tuple[int, ...], hidden_size: int) -> tuple:
    """Logical axes of one parameter, from its name and shape (leading scanned-layer axis included)."""
    name = path[-1]
    scanned = path[0] == "layers"
    core = shape[1:] if scanned else shape
    if name == "embedding":
        axes = ("vocab", "embed")
    elif name == "lm_head":
        axes = ("embed", "vocab")
    elif name == "gate_up_proj":
        axes = ("expert", "embed", "mlp")
    elif name == "down_proj" and len(core) == 3:
        axes = ("expert", "mlp", "embed")
    elif name == "gate" and len(core) == 2:  # router [D, E]: small, replicated over experts
        axes = ("embed", None)
    elif len(core) == 2 and name == "kernel":
        axes = ("embed", "mlp") if core[0] == hidden_size else ("mlp", "embed")
    elif name == "conv1d":
        axes = (None, "mlp")
    else:
        axes = (None,) * len(core)
    return (("layers",) if scanned else ()) + axes


def param_specs(params_or_shapes, mesh: Mesh, hidden_size: int, rules: dict | None = None):
    def one(path, leaf):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        return spec_for(param_logical_axes(keys, leaf.shape, hidden_size), leaf.shape, mesh, rules)

    return jax.tree_util.tree_map_with_path(one, params_or_shapes)


def param_shardings(params_or_shapes, mesh: Mesh, hidden_size: int, rules: dict | None = None):
    specs = param_specs(params_or_shapes, mesh, hidden_size, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(state_shapes, mesh: Mesh, hidden_size: int, rules: dict | None = None):
    """Optimizer state mirrors the parameters it belongs to: any subtree shaped like params is sharded like them;
    scalars (counts, step) are replicated."""

    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        # find the parameter path inside the optimizer pytree: it starts at the first model-level key
        for start in range(len(keys)):
            if keys[start] in ("embed_tokens", "layers", "norm", "lm_head", "mtp"):
                sub = tuple(str(k) for k in keys[start:])
                spec = spec_for(param_logical_axes(sub, leaf.shape, hidden_size), leaf.shape, mesh, rules)
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, state_shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: dict | None = None, batch_size: int | None = None):
    shape = (batch_size or math.prod(mesh.devices.shape),) + (1,) * (ndim - 1)
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict | None = None):
    """Activates activation constraints (`constrain`) for code traced inside the block."""
    _ACTIVE.append((mesh, DEFAULT_RULES if rules is None else rules))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x, logical: Sequence[str | None]):
    """Constrains an activation to its logical sharding; a no-op outside `use_mesh`."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical, x.shape, mesh, rules)))


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (or the older experimental one), replication checks off: Pallas calls inside cannot be
    checked, and the expert-parallel dispatch's outputs are correct by construction."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _expert_axes(num_experts: int):
    """Mesh axes the routed experts are split over under the active mesh (None: not split)."""
    if not _ACTIVE:
        return None
    mesh, rules = _ACTIVE[-1]
    return spec_for(("expert",), (num_experts,), mesh, rules)[0]


def expert_parallel_size(num_experts: int) -> int:
    """How many shards the routed experts are split over under the active mesh (1: the MoE is one program)."""
    axes = _expert_axes(num_experts)
    if axes is None:
        return 1
    mesh, _ = _ACTIVE[-1]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def shard_experts(local_fn, x_ND, weights_NK, experts_NK, w_gate_up_EDF2, w_down_EFD):
    """Expert parallelism: `local_fn(x, weights, experts, w_gate_up, w_down, axis_name=...)` runs once per device
    under `shard_map`, on the device's tokens (split over the `batch` mesh axes as far as N divides) and its experts'
    weights (split over the `expert` axes; the fsdp/tensor shards of each expert are gathered on entry, and their
    gradients reduced on exit, by shard_map's transpose). Returns [N, D] sharded like the tokens."""
    mesh, rules = _ACTIVE[-1]
    E = w_gate_up_EDF2.shape[0]
    axes = _expert_axes(E)
    tokens = spec_for(("tokens", None), x_ND.shape, mesh, rules)
    experts = P(axes, None, None)
    f = _shard_map(lambda *a: local_fn(*a, axis_name=axes), mesh, in_specs=(tokens, tokens, tokens, experts, experts),
                   out_specs=tokens)
    return f(x_ND, weights_NK, experts_NK, w_gate_up_EDF2, w_down_EFD)


def shard_kernel(fn, args, logical, out_logical):
    """Runs `fn(*args)` once per device under `shard_map`, each array split along its logical axes, for kernels that
    XLA cannot partition (Pallas calls are opaque to it and would otherwise be gathered and run whole on every
    device). `logical[i]` names the axes of `args[i]` (None entries of `args` pass through), `out_logical` those of
    each output (None for an output that is None). Heads go over `tensor` only if every head dimension divides.
    A plain call outside `use_mesh`."""
    if not _ACTIVE:
        return fn(*args)
    return shard_sequence(lambda *a, axis_name: fn(*a), args, logical, out_logical)


def _axes_of(spec_entry) -> tuple:
    return () if spec_entry is None else ((spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry))


def sequence_shards(seq_len: int | None = None) -> int:
    """How many devices split the sequence under the active mesh (1: no context parallelism)."""
    if not _ACTIVE:
        return 1
    mesh, rules = _ACTIVE[-1]
    axes = _axes_of(spec_for(("seq",), (seq_len or mesh.size,), mesh, rules)[0])
    return math.prod(mesh.shape[a] for a in axes)


def shard_sequence(fn, args, logical, out_logical):
    """Context parallelism: runs `fn(*args, axis_name=...)` once per device under `shard_map`, every array split
    along its logical axes with `seq` over the sequence mesh axes, so each device holds a contiguous slice of each
    sequence; `fn` exchanges what crosses slices with collectives over `axis_name` (None without a sequence split).
    `fn` returns a tuple, `out_logical` names the axes of each output. `logical[i]` may be "kernel": an object with
    `manual_sharding_spec` whose tables split like [heads, seq] (the splash kernel, built for `head_shards` and
    `sequence_shards`). Heads go over `tensor` only if every head dimension divides. A plain call with
    axis_name=None outside `use_mesh`."""
    if not _ACTIVE:
        return fn(*args, axis_name=None)
    mesh, rules = _ACTIVE[-1]
    arrays = [(a, names) for a, names in zip(args, logical) if a is not None and names != "kernel"]
    rules = _head_rules([a for a, _ in arrays], [n for _, n in arrays], mesh, rules)
    seq_len = next((a.shape[i] for a, names in arrays for i, n in enumerate(names) if n == "seq"), None)
    head_dim = next((a.shape[i] for a, names in arrays for i, n in enumerate(names) if n == "heads"), 1)
    seq_axes = () if seq_len is None else _axes_of(spec_for(("seq",), (seq_len,), mesh, rules)[0])
    head_axes = _axes_of(spec_for(("heads",), (head_dim,), mesh, rules)[0])
    axis_name = (seq_axes[0] if len(seq_axes) == 1 else seq_axes) if seq_axes else None
    present = [i for i, a in enumerate(args) if a is not None]

    def spec(i):
        if logical[i] == "kernel":
            heads = (head_axes[0] if len(head_axes) == 1 else head_axes) if head_axes else None
            return args[i].manual_sharding_spec(NamedSharding(mesh, P(heads, axis_name)))
        return spec_for(logical[i], args[i].shape, mesh, rules)

    in_specs = tuple(spec(i) for i in present)
    shapes = jax.eval_shape(lambda *a: fn(*a, axis_name=None), *args)
    out_specs = tuple(None if s is None else spec_for(names, s.shape, mesh, rules)
                      for s, names in zip(shapes, out_logical))

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full, axis_name=axis_name)

    return _shard_map(local, mesh, in_specs=in_specs, out_specs=out_specs)(*(args[i] for i in present))


def head_shards(head_dims) -> int:
    """How many devices split the heads under the active mesh (every head dimension must divide, else 1)."""
    if not _ACTIVE:
        return 1
    mesh, rules = _ACTIVE[-1]
    axes = [_axes_of(spec_for(("heads",), (d,), mesh, rules)[0]) for d in head_dims]
    if any(a != axes[0] for a in axes):
        return 1
    return math.prod(mesh.shape[a] for a in axes[0])


def _head_rules(args, logical, mesh, rules):
    """Rules with heads replicated unless the mesh's head axes divide every head dimension among the arrays."""
    head_dims = [a.shape[i] for a, names in zip(args, logical) if a is not None
                 for i, n in enumerate(names) if n == "heads"]
    if head_dims and any(spec_for(("heads",), (d,), mesh, rules)[0] != spec_for(("heads",), (head_dims[0],), mesh,
                                                                                   rules)[0] for d in head_dims):
        return {**rules, "heads": None}
    return rules


def process_batch_slice(global_batch: int) -> tuple[int, int]:
    """(start, size) of this process's rows of the global batch."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"batch_size={global_batch} is not divisible by the {n} processes")
    per = global_batch // n
    return i * per, per
