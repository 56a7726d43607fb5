"""The PyTorch side of `python -m bench.embed`: the same embedding job in transformers.

Imported only by a PyTorch worker process (`python -m bench.workers torch
embed`), so JAX never enters that process. The job is what a PyTorch user
would write with transformers' classes. It reads the JSON Lines file and loads
each image with `transformers.image_utils.load_image`. Then it runs
`BridgeTowerProcessor` and `BridgeTowerForContrastiveLearning` (eval mode,
`torch.no_grad()`) on one batch after the other and saves the `cross_embeds`
as one `.npy`. Images are decoded in the calling thread, and PyTorch keeps its
default thread counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.image_utils import load_image

transformers.utils.logging.disable_progress_bar()

TASKS = ("job", "model")
# The text fields `bt_jax.embed.records` reads, in the same order.
TEXT_FIELDS = ("text", "caption")


class TorchEmbedRunner:
    """Runs the embedding job in PyTorch, or only its model calls.

    Tasks:

    - "job": each call reads the records, loads and preprocesses the images,
      tokenises, embeds and writes `joint.npy`, into a new folder under
      `work_dir` each time.
    - "model": the batches are preprocessed once, here, as the job does. Each
      call embeds them all, one batch after the other.
    """

    framework = "PyTorch"

    def __init__(
        self,
        task: str,
        checkpoint: str,
        *,
        source: str,
        batch_size: int,
        work_dir: str,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.last_loss = None
        self.compile_seconds = None
        self.source = Path(source)
        self.batch_size = batch_size
        self.work_dir = Path(work_dir)
        self.processor = transformers.BridgeTowerProcessor.from_pretrained(checkpoint)
        self.model = transformers.BridgeTowerForContrastiveLearning.from_pretrained(
            checkpoint
        ).eval()
        # bt-jax truncates texts to the position table: RoBERTa numbers tokens
        # from pad_token_id + 1, so T tokens need position T + pad_token_id.
        text = self.model.config.text_config
        self.max_length = text.max_position_embeddings - text.pad_token_id - 1
        self.calls = 0
        self.output: np.ndarray | Path | None = None
        if task == "model":
            self.batches = [self._preprocess(batch) for batch in self._read_batches()]

    def _read_batches(self) -> list[list[dict]]:
        """Return the JSON Lines records in batches of `batch_size`."""
        with self.source.open(encoding="utf-8") as file:
            records = [json.loads(line) for line in file if line.strip()]
        size = self.batch_size
        return [records[start : start + size] for start in range(0, len(records), size)]

    def _preprocess(self, batch: list[dict]):
        """Load a batch's images and tokenise its texts with the processor."""
        root = self.source.parent
        images = [load_image(str(root / record["image"])) for record in batch]
        texts = [_text(record) for record in batch]
        return self.processor(
            images=images,
            text=texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def _embed(self, inputs) -> np.ndarray:
        return self.model(**inputs).cross_embeds.numpy()

    def call(self) -> None:
        """Run one job, or embed every preprocessed batch.

        PyTorch on the CPU returns only when the work is done.
        """
        with torch.no_grad():
            if self.task == "job":
                parts = [
                    self._embed(self._preprocess(batch))
                    for batch in self._read_batches()
                ]
                out = self.work_dir / f"job-{self.calls}"
                out.mkdir(parents=True)
                np.save(out / "joint.npy", np.concatenate(parts).astype(np.float32))
                self.output = out / "joint.npy"
            else:
                parts = [self._embed(inputs) for inputs in self.batches]
                self.output = np.concatenate(parts)
        self.calls += 1

    def reference_outputs(self) -> np.ndarray:
        """Return the joint embeddings of the last call, `(pairs, dim)` float32."""
        if self.output is None:
            raise RuntimeError("no call has run yet; send a run request first")
        if isinstance(self.output, Path):
            return np.load(self.output)
        return self.output

    @staticmethod
    def thread_counts() -> dict[str, int]:
        return {
            "intra-op threads": torch.get_num_threads(),
            "inter-op threads": torch.get_num_interop_threads(),
        }


def _text(record: dict) -> str:
    for field in TEXT_FIELDS:
        if field in record:
            return record[field]
    raise ValueError(f"record {record.get('id')!r} has no {' or '.join(TEXT_FIELDS)}")
