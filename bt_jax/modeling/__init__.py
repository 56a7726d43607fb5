"""Flax NNX modules of BridgeTower, named after transformers' PyTorch module tree."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from bt_jax.config import HEAD_ARCHITECTURES, BridgeTowerConfig
from bt_jax.modeling.bridgetower import BridgeTowerModel
from bt_jax.modeling.heads import (
    PRETRAINING_HEADS,
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerForPreTraining,
    parse_heads,
)
from bt_jax.modeling.outputs import (
    BridgeTowerModelOutput,
    ContrastiveOutput,
    MaskedLMOutput,
    PreTrainingOutput,
    SequenceClassifierOutput,
)
from bt_jax.modeling.tasks import (
    TASK_MODEL_CLASSES,
    BridgeTowerForNLVR2,
    BridgeTowerForVisualEntailment,
    BridgeTowerForVisualQuestionAnswering,
)

MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "model": BridgeTowerModel,
    "mlm": BridgeTowerForMaskedLM,
    "itm": BridgeTowerForImageAndTextRetrieval,
    "itc": BridgeTowerForContrastiveLearning,
    **TASK_MODEL_CLASSES,
}


def model_class(head: str) -> Callable[..., nnx.Module]:
    """Return the constructor for a head name.

    The names are "model", "mlm", "itm", "itc", the fine-tuning heads "vqa",
    "nlvr2" and "snli-ve" (`bt_jax.modeling.tasks`), or several of mlm, itm and
    itc joined by "+" (such as "mlm+itm+itc") for `BridgeTowerForPreTraining`.
    """
    if "+" in head:
        return functools.partial(BridgeTowerForPreTraining, heads=parse_heads(head))
    if head not in MODEL_CLASSES:
        raise ValueError(
            f"head={head!r} is not supported; use one of {', '.join(MODEL_CLASSES)}, "
            "or several of mlm, itm and itc joined by '+'."
        )
    return MODEL_CLASSES[head]


def head_name(model: nnx.Module) -> str:
    """Return the head name of a model instance: the inverse of `model_class`."""
    if isinstance(model, BridgeTowerForPreTraining):
        return "+".join(model.heads)
    for head, cls in MODEL_CLASSES.items():
        if type(model) is cls:
            return head
    raise TypeError(f"{type(model).__name__} is not a bt-jax BridgeTower model class.")


def create_model(
    config: BridgeTowerConfig,
    head: str | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Create a randomly initialised model; `head` (see `model_class`) defaults to
    the config's architecture."""
    head = head or config.default_head
    return model_class(head)(
        config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=seed)
    )


__all__ = [
    "HEAD_ARCHITECTURES",
    "PRETRAINING_HEADS",
    "BridgeTowerForContrastiveLearning",
    "BridgeTowerForImageAndTextRetrieval",
    "BridgeTowerForMaskedLM",
    "BridgeTowerForNLVR2",
    "BridgeTowerForPreTraining",
    "BridgeTowerForVisualEntailment",
    "BridgeTowerForVisualQuestionAnswering",
    "BridgeTowerModel",
    "BridgeTowerModelOutput",
    "ContrastiveOutput",
    "MaskedLMOutput",
    "PreTrainingOutput",
    "SequenceClassifierOutput",
    "create_model",
    "head_name",
    "model_class",
    "parse_heads",
]
