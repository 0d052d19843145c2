"""Sharding: the device mesh (axes `data` and `model`), the one table of logical-axis rules, and
how a model's parameters and generation state are placed on the mesh; plus the choice of mesh
shape from parameter bytes and device memory (pure arithmetic, no JAX: preflight calls it).

Every family names the logical axes of each parameter and state leaf (`PARAM_AXES`,
`STATE_AXES` in model/transformer.py and model/griffin.py); `LOGICAL_AXIS_RULES` maps those names
onto mesh axes, as MaxText's `logical_axis_rules` does. A dimension that does not divide its
mesh axis is replicated, never an error. JAX is imported inside the functions that need it.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical dimension -> mesh axis (None: replicated). The one place these choices live.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),  # decode slots / rows of a call
    ("vocab", "model"),  # embedding rows and the tied output projection
    ("embed", None),  # d_model (the residual stream stays whole on every device)
    ("heads", "model"),  # query heads (q, o)
    ("kv_heads", "model"),  # key/value heads (k, v and the KV caches)
    ("head_dim", None),
    ("mlp", "model"),  # the GeGLU hidden width F
    ("lru_width", "model"),  # RecurrentGemma's RG-LRU / recurrent branch width L
    ("lru_heads", "model"),  # blocks N of the block-diagonal RG-LRU gates
    ("conv", None),  # the conv1d taps W (and the W-1 cached inputs)
    ("cache_len", None),  # cache slots S / L
)
_RULES = dict(LOGICAL_AXIS_RULES)

# Parameters may take at most this share of one device's memory; the rest holds the generation
# state (KV caches), activations and XLA's own buffers.
PARAM_MEMORY_FRACTION = 0.75

Axes = tuple  # logical names of one leaf's dimensions, e.g. ("vocab", "embed")


# ----------------------------------------------------------------------------------------------
# Mesh shape (no JAX).


def chips_needed(param_bytes: int, device_bytes: int | None) -> int:
    """Devices the parameters must be split over so that each holds at most
    `PARAM_MEMORY_FRACTION` of its memory (1 when `device_bytes` is unknown, e.g. on CPU)."""
    if param_bytes < 0:
        raise ValueError(f"param_bytes must be >= 0, got {param_bytes}")
    if not device_bytes:
        return 1
    return max(1, math.ceil(param_bytes / (PARAM_MEMORY_FRACTION * device_bytes)))


def choose_mesh_shape(n_devices: int, param_bytes: int, device_bytes: int | None
                      ) -> tuple[int, int]:
    """(data, model): a model that fits one device runs data-parallel over all of them; one that
    does not is split over `model` as little as it must (the smallest divisor of `n_devices`
    that is at least `chips_needed`).

    Raises:
      ValueError: not even all `n_devices` together hold the parameters.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    need = chips_needed(param_bytes, device_bytes)
    if need > n_devices:
        raise ValueError(
            f"the model's {param_bytes / 1e9:.1f} GB of parameters need {need} devices of "
            f"{(device_bytes or 0) / 1e9:.1f} GB, but only {n_devices} are available; use more "
            "devices (or bfloat16)")
    model = min(m for m in range(need, n_devices + 1) if n_devices % m == 0)
    return n_devices // model, model


def check_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int]:
    """A valid (data, model) over exactly `n_devices`, or a one-line ValueError."""
    try:
        data, model = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise ValueError(f"mesh_shape must be two ints (data, model), got {shape!r}") from None
    if data < 1 or model < 1 or data * model != n_devices:
        raise ValueError(f"mesh_shape {(data, model)} must be two positive ints whose product is "
                         f"the {n_devices} visible devices, e.g. ({n_devices}, 1) or "
                         f"(1, {n_devices})")
    return data, model


# ----------------------------------------------------------------------------------------------
# The mesh and partition specs.


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device this process sees); its axes
    are `Auto`, so XLA propagates shardings through the programs from their inputs."""
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    data, model = check_mesh_shape(shape, len(devices))
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def mesh_dict(mesh: Mesh | None) -> dict[str, int]:
    """{'data': d, 'model': m} of a mesh (None: one device, {'data': 1, 'model': 1})."""
    if mesh is None:
        return {"data": 1, "model": 1}
    return {a: int(mesh.shape[a]) for a in MESH_AXES}


def partition_spec(shape: Sequence[int], axes: Axes, mesh_shape: Mapping[str, int]
                   ) -> PartitionSpec:
    """The PartitionSpec of one array: each logical name mapped by `LOGICAL_AXIS_RULES`; a
    dimension stays whole when its mesh axis has size 1, does not divide it, or is already used
    by an earlier dimension."""
    from jax.sharding import PartitionSpec

    out: list[str | None] = []
    for dim, name in zip(shape, axes):
        if name is not None and name not in _RULES:
            raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axis = _RULES.get(name) if name is not None else None
        size = mesh_shape.get(axis, 1) if axis else 1
        if axis is None or size == 1 or dim % size or axis in out:
            out.append(None)
        else:
            out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _leaf_name(path: tuple) -> str:
    """The last named key on a pytree path (a dict key or a field name; list indices skipped)."""
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))  # DictKey / GetAttrKey
        if isinstance(name, str):
            return name
    raise ValueError(f"pytree path {path} has no named key to look up its logical axes")


def logical_axes(tree: Any, table: Mapping[str, Axes], what: str) -> Any:
    """Per leaf of `tree` (arrays or ShapeDtypeStructs), its logical axes from `table`, looked up
    by the leaf's last named key; raises ValueError on a leaf the table misses or misdescribes."""
    import jax

    def one(path: tuple, leaf: Any) -> Axes:
        name = _leaf_name(path)
        if name not in table:
            raise ValueError(f"{what} leaf {jax.tree_util.keystr(path)} ({name!r}) has no "
                             "entry in its family's logical-axes table")
        axes = table[name]
        if len(axes) != len(leaf.shape):
            raise ValueError(f"{what} leaf {jax.tree_util.keystr(path)} has shape {leaf.shape} "
                             f"but its logical axes are {axes}")
        return _AxesLeaf(axes)

    return jax.tree_util.tree_map_with_path(one, tree)


class _AxesLeaf(tuple):
    """A tuple of logical names kept as one pytree leaf (a plain tuple would be a node)."""


def tree_shardings(tree: Any, table: Mapping[str, Axes], mesh: Mesh, what: str) -> Any:
    """A NamedSharding per leaf of `tree` from the family's logical-axes `table`."""
    import jax
    from jax.sharding import NamedSharding

    shape = mesh_dict(mesh)
    axes = logical_axes(tree, table, what)
    return jax.tree_util.tree_map(
        lambda leaf, ax: NamedSharding(mesh, partition_spec(leaf.shape, ax, shape)), tree, axes)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Axis 0 over `data` (when it divides), the rest whole: per-row arrays [B, ...]."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, partition_spec(shape, ("batch",) + (None,) * (len(shape) - 1),
                                              mesh_dict(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of more than one device the leaves of `tree` are placed on, else None."""
    import jax
    from jax.sharding import NamedSharding

    leaves = jax.tree_util.tree_leaves(tree)
    sh = getattr(leaves[0], "sharding", None) if leaves else None
    return sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None


# ----------------------------------------------------------------------------------------------
# Placement and measurement.


def place(tree: Any, shardings: Any) -> Any:
    """`tree` put onto the mesh with `shardings` (a no-op for leaves already placed so)."""
    import jax

    return jax.device_put(tree, shardings)


def tree_bytes(tree: Any) -> int:
    """Bytes of all leaves of `tree` (whole arrays, however they are placed)."""
    import jax

    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of `tree`'s addressable shards held by each device."""
    import jax

    per: collections.Counter = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            per[shard.device] += shard.data.size * shard.data.dtype.itemsize
    return dict(per)


def device_memory(device: Any) -> int | None:
    """A device's memory limit in bytes (`memory_stats()['bytes_limit']`), None where unknown
    (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """New arrays land in host memory (JAX's CPU device) while inside: load a model there, then
    `place` it, so a model too big for one accelerator never lands whole on the first one."""
    import jax

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS excludes it)
        yield
        return
    with jax.default_device(cpu):
        yield


__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "PARAM_MEMORY_FRACTION", "batch_sharding",
           "bytes_per_device", "check_mesh_shape", "chips_needed", "choose_mesh_shape",
           "device_memory", "logical_axes", "make_mesh", "mesh_dict", "mesh_of", "on_host",
           "partition_spec", "place", "replicated", "tree_bytes", "tree_shardings"]
