"""Flax NNX modules of BridgeTower, named after transformers' PyTorch module tree."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bt_jax.config import HEAD_ARCHITECTURES, BridgeTowerConfig
from bt_jax.modeling.bridgetower import BridgeTowerModel
from bt_jax.modeling.heads import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
)
from bt_jax.modeling.outputs import (
    BridgeTowerModelOutput,
    ContrastiveOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "model": BridgeTowerModel,
    "mlm": BridgeTowerForMaskedLM,
    "itm": BridgeTowerForImageAndTextRetrieval,
    "itc": BridgeTowerForContrastiveLearning,
}


def model_class(head: str) -> type[nnx.Module]:
    """Return the module class for a head name ("model", "mlm", "itm" or "itc")."""
    if head not in MODEL_CLASSES:
        raise ValueError(
            f"head={head!r} is not supported; use one of {', '.join(MODEL_CLASSES)}."
        )
    return MODEL_CLASSES[head]


def create_model(
    config: BridgeTowerConfig,
    head: str | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Create a randomly initialised model; `head` defaults to the config's architecture."""
    head = head or config.default_head
    return model_class(head)(
        config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=seed)
    )


__all__ = [
    "HEAD_ARCHITECTURES",
    "BridgeTowerForContrastiveLearning",
    "BridgeTowerForImageAndTextRetrieval",
    "BridgeTowerForMaskedLM",
    "BridgeTowerModel",
    "BridgeTowerModelOutput",
    "ContrastiveOutput",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "create_model",
    "model_class",
]
