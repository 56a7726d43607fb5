"""Scalar logs of a run: TensorBoard event files plus a JSON Lines mirror.

Both go to the run's working directory: event files under `tensorboard/`
(written with tensorboardX, which needs no TensorFlow) and one JSON object per
write in `metrics.jsonl`, `{"step": ..., "split": ..., NAME: value, ...}`, easy
to read back with pandas or a few lines of Python. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricWriter:
    """Writes scalars of a split ("train", "eval") at a step to both logs."""

    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self._jsonl = self.path.open("a", encoding="utf-8")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {name: float(value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        # JSON has no NaN or infinity; they are written as null.
        record = {
            "step": step,
            "split": split,
            **{
                name: value if math.isfinite(value) else None
                for name, value in values.items()
            },
        }
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """Return the records of `metrics.jsonl`, optionally of one split.

    A resumed run appends to the file, so steps after the restored checkpoint
    can appear twice; the later record wins.
    """
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict] = {}
    with path.open(encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            if split is None or record["split"] == split:
                latest[(record["split"], record["step"])] = record
    return sorted(latest.values(), key=lambda record: (record["step"], record["split"]))
