"""Datasets for bt-jax: TFDS builders for local files and grain pipelines.

Build once with `python -m bt_jax.data build FORMAT SOURCE --out DIR` (or
`build_dataset`), then read with `open_records` and `make_pipeline`.
"""

from bt_jax.data.build import build_dataset, dataset_statistics
from bt_jax.data.builders import (
    BUILDERS,
    TASKS,
    BtCocoCaptions,
    BtImageText,
    BtKarpathyCaptions,
    BtNlvr2,
    BtSnliVe,
    BtVqaV2,
)
from bt_jax.data.pipeline import (
    Invalid,
    PipelineConfig,
    SkipCountingIterator,
    make_pipeline,
    mask_tokens,
)
from bt_jax.data.reading import Fields, Records, find_dataset_dir, open_records
from bt_jax.data.vqa import build_answer_vocab, normalize_answer

__all__ = [
    "BUILDERS",
    "TASKS",
    "BtCocoCaptions",
    "BtImageText",
    "BtKarpathyCaptions",
    "BtNlvr2",
    "BtSnliVe",
    "BtVqaV2",
    "Fields",
    "Invalid",
    "PipelineConfig",
    "Records",
    "SkipCountingIterator",
    "build_answer_vocab",
    "build_dataset",
    "dataset_statistics",
    "find_dataset_dir",
    "make_pipeline",
    "mask_tokens",
    "normalize_answer",
    "open_records",
]
