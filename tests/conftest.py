"""Test settings: parity runs at full float32 matmul precision."""

import logging
import warnings

import jax

jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", category=DeprecationWarning)
# Orbax logs every file operation at INFO.
logging.getLogger("absl").setLevel(logging.WARNING)
