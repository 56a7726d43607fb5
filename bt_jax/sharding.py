"""Device meshes and the logical-axis rules that map parameters and activations onto them.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`); activations are constrained with `act_batch`, `act_length`,
`act_embed`, and inside a layer `act_heads`, `act_kv` and `act_mlp`. One rules table maps those names to the mesh axes `data`, `fsdp`
and `tensor`, so changing the parallelism layout never touches the model code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
)


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """Build a mesh over all devices; one entry of `shape` may be -1 to take the rest.

    Axes use `AxisType.Auto`, so XLA's sharding propagation fills in what the
    rules leave open.
    """
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(
            f"mesh shape {tuple(shape)} has {len(shape)} entries but the mesh has axes "
            f"{tuple(axis_names)}; give one size per axis."
        )
    devices = jax.device_count()
    if shape.count(-1) > 1:
        raise ValueError(
            f"mesh shape {tuple(shape)} has more than one -1; at most one axis can fill."
        )
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if devices % known:
            raise ValueError(
                f"mesh shape {tuple(shape)} cannot fill {devices} devices: {devices} is not "
                f"divisible by {known}."
            )
        shape[shape.index(-1)] = devices // known
    if math.prod(shape) != devices:
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {devices} are "
            "available; use -1 for one axis to take the rest."
        )
    return jax.make_mesh(
        tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names)
    )


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec with `rules`; unknown names stay replicated."""
    table = dict(rules)
    return PartitionSpec(*(None if name is None else table.get(name) for name in axes))


def constrain(
    x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES
) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a mesh.

    Dimensions the mesh does not divide (an odd batch, say) stay replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = fit_spec(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """Wrap `fn` so that it runs, and is traced by `jax.jit`, with `mesh` in context.

    `constrain` does nothing unless a mesh is in context, so a jitted function
    that takes sharded arguments is wrapped with this: its activation
    constraints then hold whether or not the caller entered `jax.set_mesh`.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """Replicate the dimensions of `shape` that their mesh axes do not divide evenly.

    The vocabulary (50265 rows) is the usual case: it cannot be split in two.
    """
    fitted = []
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    for size, axes in zip(shape, padded, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[name] for name in names)
        fitted.append(axes if size % ways == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(
    abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES
) -> nnx.State:
    """Return a NamedSharding for every parameter of `abstract_state` under `rules`.

    A dimension that its mesh axes do not divide is replicated instead.
    """
    with nnx.logical_axis_rules(list(rules)):
        specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(variable, spec_variable):
        spec = fit_spec(spec_variable.get_value(), variable.shape, mesh)
        return spec_variable.replace(value=NamedSharding(mesh, spec))

    return jax.tree.map(
        to_sharding,
        abstract_state,
        specs,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def put_array(value: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """Place a host array on devices, each device receiving only its own shard."""
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(
        value.shape, sharding, lambda index: value[index]
    )
