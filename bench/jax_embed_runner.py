"""The bt-jax side of `python -m bench.embed`: the embedding job, or its model calls.

Imported only by a JAX worker process (`python -m bench.workers jax embed`), so
PyTorch never enters that process and its peak RSS is bt-jax's alone. Only
`bt_jax.embed` and what it needs are imported, not the training code.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from bt_jax.embed import Embedder, open_source, run
from bt_jax.embed.records import Record

TASKS = ("job", "model")


class JaxEmbedRunner:
    """Runs `bt_jax.embed.run` on a JSON Lines file, or only its model calls.

    Tasks:

    - "job": each call is one whole job, as `python -m bt_jax.embed run` does
      it: read the records, decode and preprocess the images, tokenise, embed
      and write `joint.npy`, into a new folder under `work_dir` each time.
    - "model": the job's batches are preprocessed once, here, with the job's
      own functions (`Embedder.tokens` and `Embedder.pixels`). Each call embeds
      them all, one batch after the other.

    Nothing compiles here: the first call compiles, as a job's first batch does.
    """

    framework = "bt-jax"

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
        self.work_dir = Path(work_dir)
        self.embedder = Embedder.from_pretrained(checkpoint, batch_size=batch_size)
        self.calls = 0
        self.output: np.ndarray | Path | None = None
        if task == "model":
            self.batches = self._preprocess()

    def _preprocess(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Return the `(input_ids, attention_mask, pixel_values)` of each batch."""
        source = open_source(self.source)
        records = [
            source.parse(position, line) for position, line in enumerate(source.raw())
        ]
        invalid = [record for record in records if not isinstance(record, Record)]
        if invalid:
            raise ValueError(
                f"{self.source} has records that cannot be embedded, such as "
                f"{invalid[0]}; the benchmark needs every record to be valid."
            )
        batches = []
        size = self.embedder.batch_size
        for start in range(0, len(records), size):
            batch = records[start : start + size]
            ids, mask = self.embedder.tokens([record.text for record in batch])
            pixels = self.embedder.pixels([record.image for record in batch], start)
            batches.append((ids, mask, pixels))
        return batches

    def call(self) -> None:
        """Run one job, or embed every preprocessed batch; return when done."""
        if self.task == "job":
            out = self.work_dir / f"job-{self.calls}"
            result = run(
                self.embedder,
                open_source(self.source),
                out,
                kinds="joint",
                progress=False,
            )
            if result.skipped:
                raise RuntimeError(
                    f"the job skipped {result.skipped} of {result.total} records, "
                    f"listed in {out / 'skipped.jsonl'}; the benchmark needs every "
                    "record embedded."
                )
            if result.pairs_embedded_now != result.total:
                raise RuntimeError(
                    f"the job embedded {result.pairs_embedded_now} of "
                    f"{result.total} records in this call because {out} held a "
                    "started job; pass an empty work_dir."
                )
            self.output = out / "joint.npy"
        else:
            parts = []
            for ids, mask, pixels in self.batches:
                handle = self.embedder.submit("joint", ids, mask, pixels)
                parts.append(self.embedder.collect(handle)["joint"])
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
            "XLA CPU devices": jax.device_count(),
            "schedulable CPUs": len(os.sched_getaffinity(0)),
        }
