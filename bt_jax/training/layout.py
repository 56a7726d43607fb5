"""Store the layers a scan runs stacked, so the train step never copies them.

`BridgeTowerModel` runs each run of identical layers as one `lax.scan`, which
needs their parameters stacked along a leading axis. Stacking them inside the
step copies them on every call: at base size that copy was 1.07 GB of the
train step's peak. `StackedLayout` moves the stacking out of the step. The
train state keeps each scanned run as one stacked subtree, and the step hands
the model row views of it (`unstack`). XLA then folds the model's own
`jnp.stack` of those rows back into the stored array, so the scan reads the
state in place, and the gradients come out stacked the same way.

In a parameter dict (`nnx.to_pure_dict`), a run of layers `start` to
`stop - 1` of the list at `path` is stored as

    path: {"stacked": <layer subtree, each leaf with a leading axis of
                       stop - start>,
           "layers": {i: <layer subtree> for the list's other indices}}

with "layers" left out when the run covers the whole list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

STACKED = "stacked"
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Layers `start` to `stop - 1` of the list at `path` in a parameter dict."""

    path: tuple[str, ...]
    start: int
    stop: int


# NOTE: a custom_vjp function supports reverse-mode differentiation only, so
# `jax.jvp` and `jax.jacfwd` through `StackedLayout.unstack` raise TypeError.
@jax.custom_vjp
def _rows(stacked: jax.Array) -> list[jax.Array]:
    return [
        jax.lax.index_in_dim(stacked, index, keepdims=False)
        for index in range(stacked.shape[0])
    ]


def _rows_forward(stacked):
    return _rows(stacked), None


def _rows_backward(_, row_grads):
    # Stacking the rows' gradients lets XLA fold them into the scan's stacked
    # gradient. The transpose of a slice would instead pad each row to the
    # full stack and sum the padded copies.
    return (jnp.stack(row_grads),)


_rows.defvjp(_rows_forward, _rows_backward)


def stack_arrays(leaves: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack(leaves)


def stack_equal(leaves: Sequence[Any]) -> Any:
    """Combine non-array leaves (labels) that must agree across the layers."""
    first = leaves[0]
    if any(leaf != first for leaf in leaves[1:]):
        raise ValueError(
            f"the layers have different values {sorted(set(map(str, leaves)))}, "
            "but a stacked leaf stores one. Give every layer of the run the same "
            "value, or train with scan_layers=False."
        )
    return first


def stack_shardings(leaves: Sequence[NamedSharding]) -> NamedSharding:
    """Shard a stacked leaf like its layers, with the layer axis unsharded."""
    first = stack_equal(leaves)
    return NamedSharding(first.mesh, PartitionSpec(None, *first.spec))


@dataclasses.dataclass(frozen=True)
class StackedLayout:
    """Converts parameter dicts between per-layer and stacked storage."""

    runs: tuple[LayerRun, ...]

    @classmethod
    def for_model(cls, model) -> StackedLayout:
        """Return the layout of the runs that `model.bridgetower` scans.

        `model` is a task or pretraining model. Without `scan_layers` on its
        backbone, no run is stacked.
        """
        backbone = model.bridgetower
        if not backbone.scan_layers:
            return cls(())
        return cls(
            tuple(
                LayerRun(("bridgetower", *path), start, stop)
                for path, start, stop in backbone.scanned_runs()
            )
        )

    def stack(
        self, tree: dict, combine: Callable[[Sequence[Any]], Any] = stack_arrays
    ) -> dict:
        """Return `tree` (per-layer) with each run stacked; leaves go to `combine`."""
        tree = _copy_dicts(_check_dict(tree))
        for run in self.runs:
            parent, name = _parent(tree, run.path)
            layers = parent[name]
            indices = range(run.start, run.stop)
            missing = [index for index in indices if index not in layers]
            if missing:
                raise ValueError(
                    f"{'.'.join(run.path)} has no layer {missing[0]}: the parameters "
                    "do not belong to this model, or are stacked already."
                )
            try:
                stacked = jax.tree.map(
                    lambda *leaves: combine(leaves), *[layers[i] for i in indices]
                )
            except ValueError as error:
                raise ValueError(
                    f"cannot stack layers {run.start} to {run.stop - 1} of "
                    f"{'.'.join(run.path)}: {error}"
                ) from error
            others = {i: layer for i, layer in layers.items() if i not in indices}
            parent[name] = {STACKED: stacked, **({LAYERS: others} if others else {})}
        return tree

    def unstack(self, tree: dict) -> dict:
        """Return `tree` (stacked) with every run split back into its layers.

        JAX arrays are split into rows whose gradient stacks back without a
        copy, so the model built from the result can run inside a
        differentiated step. Outside `jit` each row is a new buffer. NumPy
        arrays are split into views and stay on the host.
        """
        tree = _copy_dicts(_check_dict(tree))
        for run in self.runs:
            parent, name = _parent(tree, run.path)
            stored = parent[name]
            if STACKED not in stored:
                raise ValueError(
                    f"{'.'.join(run.path)} contains no stacked layers: the "
                    "parameters are per-layer already, or belong to another model."
                )
            leaves, treedef = jax.tree.flatten(stored[STACKED])
            rows = [
                list(leaf) if isinstance(leaf, np.ndarray) else _rows(leaf)
                for leaf in leaves
            ]
            layers = dict(stored.get(LAYERS, {}))
            for offset, index in enumerate(range(run.start, run.stop)):
                layers[index] = jax.tree.unflatten(
                    treedef, [leaf_rows[offset] for leaf_rows in rows]
                )
            parent[name] = dict(sorted(layers.items()))
        return tree


def _check_dict(tree):
    if not isinstance(tree, dict):
        raise TypeError(
            f"expected a dict of parameters, got {type(tree).__name__}; convert "
            "an nnx.State with nnx.to_pure_dict(state)."
        )
    return tree


def _copy_dicts(tree):
    """Copy the nested dicts of `tree`, sharing its leaves."""
    if isinstance(tree, dict):
        return {key: _copy_dicts(value) for key, value in tree.items()}
    return tree


def _parent(tree: dict, path: tuple[str, ...]) -> tuple[dict, str]:
    node = tree
    for depth, key in enumerate(path[:-1]):
        if key not in node:
            raise ValueError(
                f"the parameters have no {'.'.join(path[: depth + 1])}; they do "
                "not belong to this model."
            )
        node = node[key]
    if path[-1] not in node:
        raise ValueError(
            f"the parameters have no {'.'.join(path)}; they do not belong to "
            "this model."
        )
    return node, path[-1]
