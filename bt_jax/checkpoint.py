"""Orbax checkpoints of a training run: the train state and the data iterator together.

Each checkpoint step stores two items: `state` (step, parameters, optimizer
state and the random key, sharded as on the mesh that saved them) and `data`
(the input iterator's position, one file per process). Restoring both gives
the exact run that would have continued: the same parameters and the same next
batch. Restores go into an abstract target carrying the current shardings, so
a checkpoint saved on 8 devices restores on any other mesh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model or state it is restored into."""


def _to_saved(state) -> dict[str, Any]:
    # Orbax stores plain arrays, so the typed PRNG key is saved as its raw data.
    saved = state._asdict()
    saved["rng"] = jax.random.key_data(state.rng)
    return saved


def _abstract_saved(abstract_state) -> dict[str, Any]:
    saved = abstract_state._asdict()
    rng = abstract_state.rng
    data_shape = jax.eval_shape(jax.random.key_data, rng)
    saved["rng"] = jax.ShapeDtypeStruct(
        data_shape.shape, data_shape.dtype, sharding=rng.sharding
    )
    return saved


class RunCheckpoints:
    """Saves and restores a run's state and data iterator in `directory`.

    Saves are asynchronous unless `async_save` is False: `save` returns once
    the arrays are copied off the devices, and the files are written in the
    background. Only the last `keep` steps stay on disk.
    """

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, iterator: grain.DatasetIterator) -> None:
        """Start saving `state` and the iterator's position as `step`."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saved(state)),
                data=grain.checkpoint.CheckpointSave(iterator),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def check_compatible(self, step: int, abstract_state) -> None:
        """Raise `CheckpointMismatchError` if `step` stores other parameter shapes.

        Reads only the checkpoint's metadata, so it runs before anything is
        restored or compiled.
        """
        metadata = self.manager.item_metadata(step)
        stored = metadata.get("state")
        if stored is None:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} has no train state; "
                "it was not written by `python -m train`."
            )
        expected = _flat_shapes(abstract_state.params)
        found = _flat_shapes(stored["params"])
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        differing = sorted(
            name for name in set(expected) & set(found) if expected[name] != found[name]
        )
        if missing or extra or differing:
            details = []
            if missing:
                details.append(f"{len(missing)} parameters missing (e.g. {missing[0]})")
            if extra:
                details.append(f"{len(extra)} unexpected parameters (e.g. {extra[0]})")
            if differing:
                name = differing[0]
                details.append(
                    f"{len(differing)} with other shapes (e.g. {name}: "
                    f"{found[name]} stored, {expected[name]} expected)"
                )
            raise CheckpointMismatchError(
                f"the checkpoints in {self.directory} are of another model: "
                f"{'; '.join(details)}. Use a new --workdir, or delete "
                f"{self.directory} to start over."
            )

    def restore(self, step: int, abstract_state, iterator: grain.DatasetIterator):
        """Restore `step` into the shardings of `abstract_state`; set the iterator.

        Returns:
          The train state, of the same type as `abstract_state`.
        """
        self.check_compatible(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract_saved(abstract_state)),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        saved = dict(restored["state"])
        saved["rng"] = jax.random.wrap_key_data(saved["rng"])
        return type(abstract_state)(**saved)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = ".".join(
            str(getattr(key, "key", getattr(key, "idx", key))) for key in path
        )
        shapes[name] = tuple(
            np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
        )
    return shapes
