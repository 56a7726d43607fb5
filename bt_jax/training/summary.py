"""Text tables of a model's parameters and their shardings, for the start of a run."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import jax

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _rows(params: dict, shardings: dict) -> list[tuple[str, tuple, str, object]]:
    flat_shardings = dict(jax.tree_util.tree_leaves_with_path(shardings))
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = ".".join(
            str(getattr(key, "key", getattr(key, "idx", key))) for key in path
        )
        sharding = flat_shardings[path]
        rows.append((name, tuple(leaf.shape), str(leaf.dtype), sharding))
    return rows


def parameter_overview(params: dict, shardings: dict) -> str:
    """Return parameter counts per top-level module, and bytes per device.

    Args:
      params: nested dict of arrays or `jax.ShapeDtypeStruct`s.
      shardings: the same tree of `NamedSharding`s.
    """
    counts: dict[str, int] = defaultdict(int)
    device_bytes = 0
    total_bytes = 0
    for name, shape, dtype, sharding in _rows(params, shardings):
        size = math.prod(shape)
        counts[name.split(".")[0]] += size
        itemsize = jax.numpy.dtype(dtype).itemsize
        total_bytes += size * itemsize
        shard_shape = sharding.shard_shape(shape)
        device_bytes += math.prod(shard_shape) * itemsize
    total = sum(counts.values())
    width = max(len(name) for name in counts)
    lines = [f"{'module':<{width}}  {'parameters':>13}  {'share':>6}"]
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        lines.append(f"{name:<{width}}  {count:>13,}  {count / total:>6.1%}")
    lines.append(f"{'total':<{width}}  {total:>13,}")
    lines.append(
        f"{total_bytes / 2**20:,.1f} MiB of parameters, "
        f"{device_bytes / 2**20:,.1f} MiB on each device"
    )
    return "\n".join(lines)


def sharding_table(params: dict, shardings: dict, *, collapse_layers: bool) -> str:
    """Return one line per parameter: name, shape and partition spec.

    With `collapse_layers`, layer indices become `*` and repeated lines are
    merged, with the number of layers they stand for.
    """
    entries: dict[tuple, int] = defaultdict(int)
    order: list[tuple] = []
    for name, shape, _, sharding in _rows(params, shardings):
        if collapse_layers:
            name = _LAYER_INDEX.sub(".*", name)
        key = (name, shape, str(tuple(sharding.spec)))
        if key not in entries:
            order.append(key)
        entries[key] += 1
    width = max(len(key[0]) for key in order)
    shape_width = max(len(str(key[1])) for key in order)
    lines = [f"{'parameter':<{width}}  {'shape':<{shape_width}}  partition spec"]
    for key in order:
        name, shape, spec = key
        repeat = f"  ×{entries[key]}" if entries[key] > 1 else ""
        lines.append(f"{name:<{width}}  {shape!s:<{shape_width}}  {spec}{repeat}")
    return "\n".join(lines)
