"""PyTorch checkpoint files and the mapping between their tensors and Flax parameters."""

from bt_jax.weights.io import CheckpointFileError, open_checkpoint, write_safetensors
from bt_jax.weights.mapping import (
    CheckpointMismatchError,
    TensorMapping,
    plan_load,
    tensor_mappings,
)

__all__ = [
    "CheckpointFileError",
    "CheckpointMismatchError",
    "TensorMapping",
    "open_checkpoint",
    "plan_load",
    "tensor_mappings",
    "write_safetensors",
]
