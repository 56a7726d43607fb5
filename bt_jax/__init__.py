"""bt-jax: BridgeTower in JAX and Flax NNX, with PyTorch checkpoint conversion."""

from bt_jax.compiler import compiler_options
from bt_jax.config import BridgeTowerConfig, TextConfig, VisionConfig
from bt_jax.hub import from_pretrained, save_pretrained, save_torch_checkpoint
from bt_jax.modeling import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerForPreTraining,
    BridgeTowerModel,
    create_model,
)

__all__ = [
    "BridgeTowerConfig",
    "BridgeTowerForContrastiveLearning",
    "BridgeTowerForImageAndTextRetrieval",
    "BridgeTowerForMaskedLM",
    "BridgeTowerForPreTraining",
    "BridgeTowerModel",
    "TextConfig",
    "VisionConfig",
    "compiler_options",
    "create_model",
    "from_pretrained",
    "save_pretrained",
    "save_torch_checkpoint",
]
