"""Pretraining building blocks: the config schema, the optimizer recipe, the
objectives, the sharded train step, evaluation and metric logs.

`python -m train` (the `train/` program) drives them; `bt_jax.checkpoint` saves
and restores the state they produce.
"""

from bt_jax.training.objectives import (
    ObjectiveConfig,
    pretraining_loss,
    sample_negatives,
)
from bt_jax.training.optim import OptimizerConfig, make_optimizer, parameter_labels
from bt_jax.training.settings import RunSettings, default_config
from bt_jax.training.step import Trainer, TrainState

__all__ = [
    "ObjectiveConfig",
    "OptimizerConfig",
    "RunSettings",
    "TrainState",
    "Trainer",
    "default_config",
    "make_optimizer",
    "parameter_labels",
    "pretraining_loss",
    "sample_negatives",
]
