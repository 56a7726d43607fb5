"""Pretraining building blocks: the optimizer recipe, the objectives and the
sharded train step.

The training program that drives them (configs, checkpoints, logs, evaluation)
is not written yet; `Trainer` already runs a jitted, sharded step.
"""

from bt_jax.training.objectives import (
    ObjectiveConfig,
    pretraining_loss,
    sample_negatives,
)
from bt_jax.training.optim import OptimizerConfig, make_optimizer, parameter_labels
from bt_jax.training.step import Trainer, TrainState

__all__ = [
    "ObjectiveConfig",
    "OptimizerConfig",
    "TrainState",
    "Trainer",
    "make_optimizer",
    "parameter_labels",
    "pretraining_loss",
    "sample_negatives",
]
