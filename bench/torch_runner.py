"""The PyTorch side of a benchmark row: transformers' BridgeTower, eager, float32.

Imported only by a PyTorch worker process (`python -m bench.workers torch`),
so JAX never enters that process. Inference runs in `torch.inference_mode()`,
and the training step is `bench.torch_train.PretrainingStep`. PyTorch keeps
its default thread counts.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import transformers

from bench.torch_train import PretrainingModel, PretrainingStep

transformers.utils.logging.disable_progress_bar()

HEAD_CLASSES = {
    "itm": transformers.BridgeTowerForImageAndTextRetrieval,
    "mlm": transformers.BridgeTowerForMaskedLM,
    "itc": transformers.BridgeTowerForContrastiveLearning,
}


class TorchRunner:
    """Runs one row's PyTorch call: an inference head or the training step."""

    framework = "PyTorch"

    def __init__(self, task: str, checkpoint: str, inputs: dict[str, np.ndarray]):
        self.task = task
        self.last_loss = None
        self.batch = {
            key: torch.from_numpy(np.ascontiguousarray(value))
            for key, value in inputs.items()
        }
        # bt-jax and the input files use NHWC pixels; PyTorch takes NCHW.
        self.batch["pixel_values"] = torch.from_numpy(
            np.ascontiguousarray(inputs["pixel_values"].transpose(0, 3, 1, 2))
        )
        self.compile_seconds = None
        if task.startswith("train"):
            self.model = PretrainingModel.from_pretrained(checkpoint)
            self.step = PretrainingStep(
                self.model, share_image_encoding=task == "train"
            )
        else:
            self.model = HEAD_CLASSES[task].from_pretrained(checkpoint).eval()

    def _inference(self):
        batch = self.batch
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )

    def reference_outputs(self) -> np.ndarray:
        """Return the outputs compared with bt-jax's, computed without dropout."""
        if not self.task.startswith("train"):
            with torch.inference_mode():
                return self._inference().logits.numpy()
        batch = self.batch
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.model.head_outputs(
                    batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
                )
        finally:
            self.model.train()

    def call(self) -> None:
        """Run one timed call. PyTorch on the CPU returns only when the work is done."""
        if self.task.startswith("train"):
            self.last_loss = self.step(self.batch)["loss"]
        else:
            with torch.inference_mode():
                self._inference()

    @staticmethod
    def thread_counts() -> dict[str, int]:
        return {
            "intra-op threads": torch.get_num_threads(),
            "inter-op threads": torch.get_num_interop_threads(),
        }

    @staticmethod
    def matmul_gflops(size: int, repeats: int) -> float:
        """Return the best GFLOP/s of a float32 (size, size) @ (size, size) matmul."""
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(size, size, generator=generator)
        right = torch.randn(size, size, generator=generator)
        best = float("inf")
        with torch.inference_mode():
            torch.mm(left, right)
            for _ in range(repeats):
                started = time.perf_counter()
                torch.mm(left, right)
                best = min(best, time.perf_counter() - started)
        return 2 * size**3 / best / 1e9
