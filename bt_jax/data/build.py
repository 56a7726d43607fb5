"""Build a dataset from a source folder, and describe a built dataset."""

from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from bt_jax.data import vqa
from bt_jax.data.builders import BUILDERS
from bt_jax.data.reading import find_dataset_dir, load_metadata, open_records

logger = logging.getLogger(__name__)

STATISTICS_FILE = "statistics.json"
PLOT_FILE = "text_lengths.png"
PERCENTILES = (50, 90, 95, 99)


def build_dataset(
    format: str,
    source: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    verify_images: bool = True,
    num_threads: int | None = None,
    answer_vocab: Sequence[str] | None = None,
    min_answer_count: int = vqa.DEFAULT_MIN_ANSWER_COUNT,
) -> Path:
    """Build an ArrayRecord dataset from local files and return its folder.

    TFDS writes into a temporary folder and renames it when every split is
    written, so a failed build leaves no partial dataset behind.

    Args:
      format: one of "coco", "karpathy", "jsonl", "vqa", "nlvr2", "snli-ve".
      source: the folder with the files in that format's official layout.
      out: TFDS data folder; the dataset goes to `out/NAME/VERSION`.
      overwrite: replace a dataset already built there.
      verify_images: decode every image and skip those that fail.
      num_threads: image-reading threads (default: one per CPU).
      answer_vocab, min_answer_count: VQA only, see `BtVqaV2`.

    Raises:
      ValueError: unknown format, or VQA options with another format.
      FileNotFoundError: the source folder or its expected files are missing.
      FileExistsError: a dataset is already built in `out` and overwrite is off.
    """
    if format not in BUILDERS:
        raise ValueError(f"unknown format {format!r}; use one of {sorted(BUILDERS)}.")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(
            f"the output {out} is a file; pass a folder for the dataset (it is "
            "created if missing)."
        )
    kwargs: dict[str, Any] = {}
    if format == "vqa":
        kwargs = {"answer_vocab": answer_vocab, "min_answer_count": min_answer_count}
    elif answer_vocab is not None:
        raise ValueError(f"answer_vocab applies to the vqa format, not {format!r}.")
    builder = BUILDERS[format](
        data_dir=str(out),
        file_format="array_record",
        verify_images=verify_images,
        num_threads=num_threads,
        **kwargs,
    )
    target = Path(builder.data_dir)
    _recover_interrupted_build(target)
    previous = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(
                f"{target} already contains a built dataset; pass overwrite=True "
                "(--overwrite) to rebuild it."
            )
        # Keep the old dataset until the new one is complete.
        previous = target.with_name(f".{target.name}.previous")
        if previous.exists():
            shutil.rmtree(previous)
        target.rename(previous)
    try:
        try:
            # TFDS makes a downloads folder even when nothing is downloaded.
            with tempfile.TemporaryDirectory() as downloads:
                builder.download_and_prepare(
                    download_dir=downloads,
                    download_config=tfds.download.DownloadConfig(
                        manual_dir=str(source)
                    ),
                )
        except AssertionError as err:
            # TFDS asserts that every split has examples. A split whose image
            # files all exist but none decodes ends up empty.
            match = re.search(r'split "(\w+)": No examples were yielded', str(err))
            if match is None:
                raise
            split = match[1]
            raise ValueError(
                f"split {split} of {source} has no image that decodes (skipped: "
                f"{builder.skips.counts(split)}). Fix or remove the broken images."
            ) from None
    except BaseException:
        if previous is not None:
            if target.exists():
                shutil.rmtree(target)
            previous.rename(target)
            logger.warning("build failed; kept the previous dataset in %s", target)
        raise
    if previous is not None:
        shutil.rmtree(previous)
    total = len(builder.skips.entries)
    counts = builder.skips.counts()
    logger.info(
        "built %s in %s; %d skipped%s",
        builder.name,
        target,
        total,
        f" ({counts})" if total else "",
    )
    return target


def build_sample_dataset(out: str | Path, *, overwrite: bool = False) -> Path:
    """Build the bundled sample photos and captions as a JSON Lines dataset.

    The source files go to `out/source` (`images/` and `train.jsonl`, one split
    named train) and the dataset to `out/bt_image_text/VERSION`.
    """
    from bt_jax.samples import materialize

    out = Path(out)
    source = out / "source"
    materialize(source, overwrite=overwrite).replace(source / "train.jsonl")
    return build_dataset("jsonl", source, out, overwrite=overwrite)


def _recover_interrupted_build(target: Path) -> None:
    """Restore or remove what a killed rebuild of `target` left behind."""
    previous = target.with_name(f".{target.name}.previous")
    if previous.exists():
        if target.exists():
            logger.warning("removing %s, left by an interrupted rebuild", previous)
            shutil.rmtree(previous)
        else:
            logger.warning(
                "an interrupted rebuild left the previous dataset in %s; restoring it",
                previous,
            )
            previous.rename(target)
    for leftover in target.parent.glob(f"incomplete.*_{target.name}"):
        logger.warning("removing %s, left by an interrupted build", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    result = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    result["max"] = int(array.max())
    result["mean"] = float(array.mean())
    return result


def dataset_statistics(
    dataset: str | Path,
    *,
    tokenizer=None,
    max_text_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Count a built dataset's images and texts and measure its text lengths.

    Reads every record once. Text lengths are in tokens (special tokens
    included) when a tokenizer is given, otherwise in whitespace-separated words.
    The result is also written to `statistics.json` in the dataset folder, with
    a histogram of the lengths in `text_lengths.png`.
    """
    directory = find_dataset_dir(dataset)
    metadata = load_metadata(directory)
    info = tfds.builder_from_directory(str(directory)).info
    result: dict[str, Any] = {
        "dataset": info.name,
        "path": str(directory),
        "format": metadata.get("format"),
        "task": None,
        "length_unit": "tokens" if tokenizer is not None else "words",
        "max_text_length": max_text_length,
        "splits": {},
    }
    if metadata.get("answer_vocab") is not None:
        result["answers"] = len(metadata["answer_vocab"])
    lengths_by_split = {}
    for split in sorted(info.splits, key=_split_order):
        records = open_records(directory, split)
        result["task"] = records.task
        label_counts = collections.Counter()
        texts_per_image, texts = [], []
        for index in tqdm.trange(
            len(records), desc=f"read {split}", unit="image", disable=not progress
        ):
            record = records[index]
            texts_per_image.append(len(record["texts"]))
            texts.extend(record["texts"])
            label_counts.update(int(label) for label in record.get("labels", []))
        lengths = _text_lengths(texts, tokenizer)
        lengths_by_split[split] = lengths
        split_stats = {
            "images": len(records),
            "texts": len(texts),
            "texts_per_image": {
                "mean": float(np.mean(texts_per_image)) if texts_per_image else 0.0,
                "min": int(min(texts_per_image, default=0)),
                "max": int(max(texts_per_image, default=0)),
            },
            "text_length": _percentiles(lengths),
            "skipped": metadata.get("skipped", {}).get(split, {}),
        }
        if records.label_names is not None:
            split_stats["labels"] = {
                name: label_counts[label]
                for label, name in enumerate(records.label_names)
            }
        if max_text_length is not None and lengths:
            split_stats["truncated_share"] = float(
                np.mean(np.asarray(lengths) > max_text_length)
            )
        result["splits"][split] = split_stats
    if metadata.get("skipped", {}).get("all"):
        result["skipped_outside_splits"] = metadata["skipped"]["all"]
    try:
        (directory / STATISTICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
        _plot_lengths(
            lengths_by_split, result["length_unit"], max_text_length, directory
        )
    except OSError as err:
        logger.warning("cannot write the statistics into %s: %s", directory, err)
    return result


def _split_order(split: str) -> tuple[int, str]:
    usual = ("train", "restval", "val", "validation", "test", "test_dev")
    return (usual.index(split) if split in usual else len(usual), split)


def _text_lengths(texts: list[str], tokenizer) -> list[int]:
    if tokenizer is None:
        return [len(text.split()) for text in texts]
    lengths = []
    for start in range(0, len(texts), 1024):
        encoded = tokenizer(texts[start : start + 1024], add_special_tokens=True)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def _plot_lengths(
    lengths_by_split: dict[str, list[int]],
    unit: str,
    limit: int | None,
    directory: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for split, lengths in lengths_by_split.items():
        if lengths:
            bins = np.arange(0, max(lengths) + 2) - 0.5
            axis.hist(lengths, bins=bins, histtype="step", label=split)
    if limit is not None:
        axis.axvline(limit, color="black", linestyle="--", label=f"limit {limit}")
    axis.set_xlabel(f"text length ({unit})")
    axis.set_ylabel("texts")
    axis.legend()
    figure.tight_layout()
    figure.savefig(directory / PLOT_FILE, dpi=100)
    plt.close(figure)


def format_statistics(stats: dict[str, Any]) -> str:
    """Render `dataset_statistics` output as a short text table."""
    unit = stats["length_unit"]
    lines = [f"{stats['dataset']} at {stats['path']}"]
    if "answers" in stats:
        lines.append(f"answer vocabulary: {stats['answers']} answers")
    header = (
        f"{'split':<10} {'images':>8} {'texts':>8} {'per image':>14} "
        f"{unit + ' p50/p90/p99/max':>24}  skipped"
    )
    lines += [header, "-" * len(header)]
    for split, row in stats["splits"].items():
        per = row["texts_per_image"]
        per_image = f"{per['mean']:.2f} ({per['min']}-{per['max']})"
        length = row["text_length"]
        length_text = (
            f"{length['p50']:.0f}/{length['p90']:.0f}/{length['p99']:.0f}/{length['max']}"
            if length
            else "-"
        )
        skipped = ", ".join(f"{k}: {v}" for k, v in row["skipped"].items()) or "0"
        lines.append(
            f"{split:<10} {row['images']:>8} {row['texts']:>8} {per_image:>14} "
            f"{length_text:>24}  {skipped}"
        )
        if "labels" in row:
            shares = ", ".join(f"{k}: {v}" for k, v in row["labels"].items())
            lines.append(f"{'':<10} labels {shares}")
        if "truncated_share" in row:
            lines.append(
                f"{'':<10} {row['truncated_share']:.1%} of texts longer than "
                f"{stats['max_text_length']} tokens (truncated in training)"
            )
    if stats.get("skipped_outside_splits"):
        lines.append(f"skipped outside any split: {stats['skipped_outside_splits']}")
    return "\n".join(lines)
