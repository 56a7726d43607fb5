"""The bt-jax side of a benchmark row: load, compile, run and measure.

Imported only by a JAX worker process (`python -m bench.workers jax`), so
PyTorch never enters that process and its peak RSS is bt-jax's alone.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bt_jax import compiler, hub, sharding
from bt_jax.training.objectives import ObjectiveConfig
from bt_jax.training.optim import OptimizerConfig
from bt_jax.training.step import Trainer

TEXT_KEYS = ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")
TRAIN_REMAT = "dots"


class JaxRunner:
    """Runs one row's bt-jax call: an inference head or the training step."""

    framework = "bt-jax"

    def __init__(self, task: str, checkpoint: str, inputs: dict[str, np.ndarray]):
        self.task = task
        self.last_loss = None
        arrays = {
            key: value.astype(np.int32) if key in TEXT_KEYS else value
            for key, value in inputs.items()
        }
        if task.startswith("train"):
            self._setup_train(checkpoint, arrays)
        else:
            self._setup_inference(checkpoint, arrays)

    def _setup_inference(self, checkpoint: str, arrays: dict) -> None:
        model, _ = hub.from_pretrained(checkpoint, head=self.task)
        graphdef, state = nnx.split(model)

        def logits(state, input_ids, attention_mask, pixel_values):
            model = nnx.merge(graphdef, state)
            return model(input_ids, attention_mask, pixel_values).logits

        self.arguments = (
            state,
            jnp.asarray(arrays["input_ids"]),
            jnp.asarray(arrays["attention_mask"]),
            jnp.asarray(arrays["pixel_values"]),
        )
        started = time.perf_counter()
        self.compiled = (
            jax.jit(logits, compiler_options=compiler.compiler_options())
            .lower(*self.arguments)
            .compile()
        )
        self.compile_seconds = time.perf_counter() - started

    def _setup_train(self, checkpoint: str, arrays: dict) -> None:
        config = hub.load_config(checkpoint)
        mesh = sharding.make_mesh((1, 1, 1))
        objective = ObjectiveConfig(fuse_passes=self.task == "train")
        # "dots" recomputes the attention weights and elementwise results in the
        # backward pass instead of keeping them: on 2 CPU cores the base step
        # ran as fast as without remat and needed 4.3 GiB less.
        self.trainer = Trainer(
            config, objective, OptimizerConfig(), mesh, remat=TRAIN_REMAT
        )
        self.batch = self.trainer.shard_batch(arrays)
        # Compiled before the weights are loaded, so that the compiler's working
        # memory is released before the state exists (`Trainer.compile_step`).
        started = time.perf_counter()
        self.compiled = self.trainer.compile_step(self.batch)
        self.compile_seconds = time.perf_counter() - started
        _, params = hub.from_pretrained(
            checkpoint, head="+".join(self.trainer.objective.heads), mesh=mesh
        )
        self.state = self.trainer.init_from_params(
            nnx.to_pure_dict(params), jax.random.key(0)
        )
        del params

    def reference_outputs(self) -> np.ndarray:
        """Return the outputs compared with PyTorch's, computed without dropout."""
        if not self.task.startswith("train"):
            return np.asarray(self.compiled(*self.arguments))

        trainer = self.trainer

        def heads(params, input_ids, attention_mask, pixel_values):
            model = trainer.model_from_params(params)
            output = model(input_ids, attention_mask, pixel_values)
            parts = (
                output.mlm_logits,
                output.itm_logits,
                output.text_embeds,
                output.image_embeds,
                output.cross_embeds,
            )
            return jnp.concatenate([part.ravel() for part in parts])

        batch = self.batch
        values = jax.jit(heads, compiler_options=compiler.compiler_options())(
            self.state.params,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
        )
        return np.asarray(values)

    def call(self) -> None:
        """Run one timed call and wait for its result."""
        if self.task.startswith("train"):
            # The step donates the state, so each call continues from the last one.
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            self.last_loss = float(metrics["loss"])
        else:
            jax.block_until_ready(self.compiled(*self.arguments))

    @staticmethod
    def thread_counts() -> dict[str, int]:
        return {
            "XLA CPU devices": jax.device_count(),
            "schedulable CPUs": len(os.sched_getaffinity(0)),
        }

    @staticmethod
    def matmul_gflops(size: int, repeats: int) -> float:
        """Return the best GFLOP/s of a float32 (size, size) @ (size, size) matmul."""
        keys = jax.random.split(jax.random.key(0))
        left = jax.random.normal(keys[0], (size, size), jnp.float32)
        right = jax.random.normal(keys[1], (size, size), jnp.float32)
        matmul = jax.jit(jnp.matmul)
        jax.block_until_ready(matmul(left, right))
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(matmul(left, right))
            best = min(best, time.perf_counter() - started)
        return 2 * size**3 / best / 1e9
