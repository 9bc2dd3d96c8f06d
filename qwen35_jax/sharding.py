"""The only place that knows about meshes: mesh construction, logical axis rules, parameter and batch shardings.

Modules name logical axes (`batch`, `seq`, `embed`, `mlp`, `heads`, `vocab`, `expert`, ...); the rules below map them
to the mesh axes `data`, `fsdp`, `tensor`, `expert` and `sequence` (context parallelism: `seq` over `sequence`;
adding a mesh axis is one entry in MESH_AXES and the rules).
Parameters declare their logical axes where they are created (`layers.common.param` / `dense`, carried as Flax
`LogicallyPartitioned` metadata); `logical_axes` reads them off an abstract init and refuses an undeclared parameter,
and optimizer state takes its shardings from the parameter tree it mirrors (`state_shardings`).
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

# logical axis -> mesh axes (in order); None = replicated. Parameters may name only these axes (or None).
DEFAULT_RULES = {
    "batch": ("data", "fsdp", "expert"),
    "tokens": ("data", "fsdp", "expert", "sequence"),  # a flattened [batch * seq] axis (activations)
    "seq": ("sequence",),
    "embed": ("fsdp", "sequence"),  # the residual stream width D of a weight; a sequence group shards weights too
    "mlp": ("tensor",),  # FFN / expert intermediate width
    "heads": ("tensor",),  # attention / Gated DeltaNet heads (flattened heads x head width)
    "kv_heads": ("tensor",),  # key/value heads of GQA attention (flattened)
    "vocab": ("tensor",),
    "expert": ("expert",),
    "layers": None,  # the stacked (scanned) layer-group axis
    "norm": None,  # norm scales
    "conv": None,  # taps of the Gated DeltaNet causal conv
}

_ACTIVE: list[tuple[Mesh, dict]] = []


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with sizes per axis; one axis may be -1 (the rest). Mistakes (an unknown
    axis, sizes that do not multiply to the device count) are one-line ConfigErrors naming the `mesh` key."""
    from qwen35_jax.schema import ConfigError, nearest

    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    for k, v in shape.items():
        if k not in MESH_AXES:
            raise ConfigError(f"mesh axis {k!r} is unknown{nearest(k, MESH_AXES)}; axes: {', '.join(MESH_AXES)}")
        if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1):
            raise ConfigError(f"mesh axis {k!r} has size {v!r}; sizes are integers >= 1, or -1 for the rest")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    if "data" not in shape and all(v != -1 for v in sizes.values()):
        sizes["data"] = -1
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh {shape}: only one axis may be -1, got {', '.join(rest)}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if len(devices) % known:
            raise ConfigError(f"mesh {shape}: the other axes multiply to {known}, which does not divide the "
                              f"{len(devices)} devices")
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh {shape} needs {math.prod(sizes.values())} devices, have {len(devices)}")
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


class LogicalAxes(tuple):
    """The logical axis names of one parameter (a pytree leaf, unlike a plain tuple)."""


class UndeclaredParameterError(ValueError):
    """A parameter created without logical axes (declare it with layers.common.param / dense)."""


def check_logical_axes(axes: tuple) -> tuple:
    """Axes a parameter may declare: DEFAULT_RULES names or None."""
    for a in axes:
        if a is not None and a not in DEFAULT_RULES:
            import difflib

            near = difflib.get_close_matches(str(a), list(DEFAULT_RULES), n=1)
            raise ValueError(f"unknown logical axis {a!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                             f"known: {', '.join(DEFAULT_RULES)}")
    return axes


def _is_box(x) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.Partitioned)


def _path_text(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_axes(boxed_params):
    """Tree of LogicalAxes from a boxed parameter tree (`module.init` output, e.g. under jax.eval_shape); a
    parameter without declared axes raises UndeclaredParameterError naming its path."""

    def one(path, x):
        if not _is_box(x):
            raise UndeclaredParameterError(
                f"parameter {_path_text(path)} {getattr(x, 'shape', '')} has no logical axes: declare it with "
                f"qwen35_jax.layers.common.param(...) or dense(...)")
        names = tuple(x.names)
        if len(names) != len(x.value.shape):
            raise UndeclaredParameterError(f"parameter {_path_text(path)}: axes {names} for shape {x.value.shape}")
        return LogicalAxes(check_logical_axes(names))

    return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=_is_box)


def unboxed(boxed_params):
    """The values of a boxed parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, boxed_params, is_leaf=_is_box)


def param_specs(boxed_params, mesh: Mesh, rules: dict | None = None):
    """PartitionSpecs (mesh axes) of a boxed parameter tree, from each parameter's declared logical axes."""
    axes = logical_axes(boxed_params)
    shapes = unboxed(boxed_params)
    return jax.tree.map(lambda a, s: spec_for(a, s.shape, mesh, rules), axes, shapes,
                        is_leaf=lambda x: isinstance(x, LogicalAxes))


def param_shardings(source, mesh: Mesh, rules: dict | None = None):
    """NamedShardings of the parameters: `source` is a ModelConfig (the model's declared axes) or a boxed parameter
    tree (a layer's `jax.eval_shape(module.init, ...)["params"]`)."""
    if not isinstance(source, dict):
        from qwen35_jax.model import abstract_params  # late import: the model imports this module

        source = abstract_params(source)
    specs = param_specs(source, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(state_shapes, params_shardings, mesh: Mesh):
    """Shardings of a training state (or any pytree holding optimizer state): every subtree with the parameters'
    structure and shapes (params, Adam moments, ...) is sharded like the parameters, by position in the tree rather
    than by name; every other leaf (step, counts) is replicated."""
    treedef = jax.tree.structure(params_shardings)
    p_leaves = jax.tree.leaves(params_shardings)

    def mirrors_params(x) -> bool:
        try:
            return jax.tree.structure(x) == treedef and treedef.num_leaves > 1
        except Exception:  # noqa: BLE001 - leaves that are not pytrees
            return False

    def one(x):
        if not mirrors_params(x):
            return NamedSharding(mesh, P())
        leaves = jax.tree.leaves(x)
        out = [sh if getattr(leaf, "shape", None) is not None and _fits(sh, leaf.shape) else NamedSharding(mesh, P())
               for leaf, sh in zip(leaves, p_leaves)]
        return jax.tree.unflatten(treedef, out)

    return jax.tree.map(one, state_shapes, is_leaf=mirrors_params)


def _fits(sharding: NamedSharding, shape) -> bool:
    try:
        sharding.shard_shape(tuple(shape))
        return len(sharding.spec) <= len(shape)
    except Exception:  # noqa: BLE001 - a shape the parameter's sharding does not divide
        return False


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
