"""The name-and-layout mapping between PyTorch state dicts and Flax parameters.

Module attributes mirror transformers' module tree, so a parameter's PyTorch key is
its Flax path joined with dots, with the leaf renamed by the kind of layer:

| Flax layer                    | Flax leaf          | PyTorch leaf | layout change                       |
|-------------------------------|--------------------|--------------|-------------------------------------|
| `nnx.Linear`                  | `kernel` (in, out) | `weight`     | transpose                           |
| `nnx.LinearGeneral`           | `kernel` (*in, *out) | `weight`   | flatten in and out, transpose       |
| `nnx.Conv`                    | `kernel` HWIO      | `weight`     | to OIHW                             |
| `nnx.LayerNorm`               | `scale`            | `weight`     | none                                |
| `nnx.Embed`                   | `embedding`        | `weight`     | none                                |
| bare `nnx.Param`              | its name           | same name    | none                                |

The packed CLIP projection `attn.in_proj.{kernel,bias}` is stored by PyTorch as
`attn.in_proj_weight` and `attn.in_proj_bias`. Every change is a transpose or a
reshape, so conversion in either direction is exact to the bit.

Loading a checkpoint follows these rules:

1. Backbone tensors match with or without the `bridgetower.` prefix that the
   head classes add, so a `BridgeTowerModel` checkpoint loads into a head class
   and a head-class checkpoint loads as the bare backbone.
2. Tensors of heads the target does not have (hub checkpoints carry MLM and ITM
   weights next to ITC ones, for example) are skipped, and the skipped keys are
   logged.
3. Legacy buffers that older transformers releases saved (`position_ids`,
   `token_type_ids` of the embeddings) are dropped.
4. Everything else must match one to one. An unknown tensor, a missing tensor or
   a shape mismatch raises `CheckpointMismatchError` naming the keys and shapes.
   A head the checkpoint lacks is an error too. With `init_missing_heads=True`
   it keeps its random initialisation instead, and a warning names every such
   tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
from flax import nnx

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "bridgetower."
# First key component of every head module of the transformers head classes.
HEAD_MODULES = (
    "mlm_score",
    "itm_score",
    "itc_text_head",
    "itc_image_head",
    "itc_cross_modal_head",
    "logit_scale",
    "vqa_classifier",
    "nlvr2_classifier",
    "snli_classifier",
)
LEGACY_BUFFERS = (
    "text_model.embeddings.position_ids",
    "text_model.embeddings.token_type_ids",
    "vision_model.visual.embeddings.position_ids",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model's parameters one to one."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """Storage of one Flax parameter in a PyTorch state dict: key, shapes and layout."""

    path: tuple[str | int, ...]
    key: str
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    layout: str  # "same", "transpose", "general" or "conv"

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """Convert a PyTorch-layout array of this parameter to the Flax layout."""
        if self.layout == "transpose":
            return array.T
        if self.layout == "general":
            return array.T.reshape(self.flax_shape)
        if self.layout == "conv":
            return array.transpose(2, 3, 1, 0)
        return array.reshape(self.flax_shape)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        """Convert a Flax-layout array of this parameter to the PyTorch layout."""
        if self.layout == "transpose":
            return np.asarray(array.T, order="C")
        if self.layout == "general":
            in_size = math.prod(self.torch_shape[1:])
            return np.asarray(array.reshape(in_size, -1).T, order="C")
        if self.layout == "conv":
            return np.asarray(array.transpose(3, 2, 0, 1), order="C")
        # np.asarray keeps 0-d scalars (logit_scale) 0-d; np.ascontiguousarray would
        # turn them into shape (1,), which transformers rejects.
        return np.asarray(array.reshape(self.torch_shape), order="C")


def tensor_mappings(model: nnx.Module) -> list[TensorMapping]:
    """List the mapping of every parameter of `model` (which may be abstract)."""
    modules = {tuple(path): node for path, node in nnx.iter_graph(model)}
    mappings = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        shape = tuple(variable.shape)
        parent = modules[path[:-1]]
        leaf = path[-1]
        module_key = ".".join(str(p) for p in path[:-1])
        if isinstance(parent, nnx.LinearGeneral):
            in_shape, out_shape = tuple(parent.in_features), tuple(parent.out_features)
            if leaf == "kernel":
                torch_shape = (math.prod(out_shape), math.prod(in_shape))
                layout = "general" if len(shape) > 2 else "transpose"
                name = "weight"
            else:
                torch_shape, layout, name = (math.prod(out_shape),), "same", "bias"
            if (
                path[-2] == "in_proj"
            ):  # packed CLIP projection, see the module docstring
                module_key = ".".join(str(p) for p in path[:-2])
                name = f"in_proj_{name}"
        elif isinstance(parent, nnx.Linear):
            name = "weight" if leaf == "kernel" else "bias"
            layout = "transpose" if leaf == "kernel" else "same"
            torch_shape = shape[::-1] if leaf == "kernel" else shape
        elif isinstance(parent, nnx.Conv):
            if leaf != "kernel":
                raise NotImplementedError(
                    f"no PyTorch mapping for conv parameter {path}"
                )
            name, layout = "weight", "conv"
            torch_shape = (shape[3], shape[2], shape[0], shape[1])
        elif isinstance(parent, nnx.LayerNorm):
            name = "weight" if leaf == "scale" else "bias"
            layout, torch_shape = "same", shape
        elif isinstance(parent, nnx.Embed):
            name, layout, torch_shape = "weight", "same", shape
        else:  # a bare parameter owned by one of our modules
            name, layout, torch_shape = str(leaf), "same", shape
        key = f"{module_key}.{name}" if module_key else name
        mappings.append(TensorMapping(path, key, shape, tuple(torch_shape), layout))
    return mappings


def canonical_key(key: str) -> str:
    """Drop the `bridgetower.` prefix, so backbone keys compare across head classes."""
    return key.removeprefix(BACKBONE_PREFIX)


def is_head_key(key: str) -> bool:
    first = canonical_key(key).split(".", 1)[0]
    return first in HEAD_MODULES and not key.startswith(BACKBONE_PREFIX)


@dataclasses.dataclass
class LoadPlan:
    """Result of matching a checkpoint: the source of each parameter, the keys left aside."""

    sources: dict[str, str]  # target key -> checkpoint key
    skipped_heads: list[str]
    dropped_buffers: list[str]
    missing_heads: list[str]


def _format_shapes(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    return "\n".join(f"  {key} {list(shapes[key])}" for key in sorted(keys))


def plan_load(
    mappings: list[TensorMapping],
    checkpoint_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    init_missing_heads: bool = False,
) -> LoadPlan:
    """Match checkpoint tensors to parameters under the rules in the module docstring.

    Raises:
      CheckpointMismatchError: on unknown or missing tensors or shape mismatches;
        the message lists every offending key with its shape.
    """
    targets = {canonical_key(m.key): m for m in mappings}
    own_heads = {
        canonical_key(m.key).split(".", 1)[0] for m in mappings if is_head_key(m.key)
    }
    available: dict[str, str] = {}
    dropped, skipped, unknown = [], [], []
    for key in checkpoint_shapes:
        canonical = canonical_key(key)
        if canonical in LEGACY_BUFFERS:
            dropped.append(key)
        elif canonical in available:
            raise CheckpointMismatchError(
                f"{source} stores {canonical!r} twice ({available[canonical]!r} and {key!r}); "
                "keep one copy."
            )
        elif canonical in targets:
            available[canonical] = key
        elif is_head_key(key) and canonical.split(".", 1)[0] not in own_heads:
            skipped.append(key)
        else:
            unknown.append(key)

    mismatched = []
    for canonical, key in available.items():
        expected = targets[canonical].torch_shape
        if tuple(checkpoint_shapes[key]) != expected:
            mismatched.append(
                f"  {key}: checkpoint {list(checkpoint_shapes[key])}, model {list(expected)}"
            )

    missing = [m.key for c, m in targets.items() if c not in available]
    missing_heads = [k for k in missing if is_head_key(k)]
    missing_other = [k for k in missing if not is_head_key(k)]
    expected_shapes = {m.key: m.torch_shape for m in mappings}

    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) in the checkpoint match no model parameter:\n"
            + _format_shapes(unknown, checkpoint_shapes)
        )
    if missing_other:
        problems.append(
            f"{len(missing_other)} model parameter(s) are missing from the checkpoint "
            "(expected shapes):\n" + _format_shapes(missing_other, expected_shapes)
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) have the wrong shape:\n"
            + "\n".join(sorted(mismatched))
        )
    if missing_heads and not init_missing_heads:
        problems.append(
            "the checkpoint has no weights for this head; missing:\n"
            + _format_shapes(missing_heads, expected_shapes)
            + "\nLoad it with the head it was saved with (head=None follows config.json), "
            "or pass init_missing_heads=True to start the head from random weights "
            "for fine-tuning."
        )
    if problems:
        raise CheckpointMismatchError(
            f"cannot load {source}: its tensors do not match the model.\n"
            + "\n".join(problems)
            + "\nCheck that config.json describes these weights (sizes, layer counts, "
            "link_tower_type, share_* flags)."
        )

    if skipped:
        logger.info(
            "Skipping %d tensor(s) of heads this model does not have: %s",
            len(skipped),
            ", ".join(sorted(skipped)),
        )
    if dropped:
        logger.debug("Dropping legacy buffers: %s", ", ".join(dropped))
    if missing_heads:
        logger.warning(
            "Head weights missing from %s keep their random initialisation: %s",
            source,
            ", ".join(missing_heads),
        )
    sources = {targets[c].key: k for c, k in available.items()}
    return LoadPlan(sources, skipped, dropped, missing_heads)
