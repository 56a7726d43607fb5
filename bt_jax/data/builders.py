"""TFDS builders that turn local files into ArrayRecord datasets.

Each builder reads a source folder (TFDS's manual directory) in one official
layout, checks every image by decoding it, and writes one record per image with
all of that image's texts. The image is stored as the source file's encoded
bytes, unchanged. bt-jax decodes it with `bt_jax.processing.load_image`, so
training gets the same pixels as inference on the original file. Neither
building nor reading needs TensorFlow.

Records are written in source order (shuffling is disabled) so that record `i`
of a split is the `i`-th kept image; the number of texts of each record is
stored in the dataset's `metadata.json`, which lets a pipeline enumerate every
(image, text) pair without reading the images. Skipped records and texts are
counted and listed there too.

Registered names: `bt_coco_captions`, `bt_karpathy_captions`,
`bt_image_text` (JSON Lines) and `bt_vqa_v2`.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from bt_jax.data import sources, vqa
from bt_jax.processing import ImageFileError, load_image

logger = logging.getLogger(__name__)

# Images are read and decoded in threads (PIL releases the GIL while decoding)
# in chunks of this many, so memory stays bounded on large splits.
_CHUNK_SIZE = 256
METADATA_KEY = "bt_jax"


def _read_image(path: Path, verify: bool) -> tuple[bytes | None, str | None]:
    """Return `(encoded bytes, None)`, or `(None, reason)` when unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"missing image: {path}"
    except OSError as err:
        return None, f"unreadable image: {path}: {err.strerror or err}"
    if not data:
        return None, f"corrupt image: {path} is empty"
    if verify:
        try:
            load_image(data)
        except ImageFileError as err:
            return None, f"corrupt image: {path}: {err}"
    return data, None


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared generation for the local-file builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FORMAT: ClassVar[str]
    DESCRIPTION: ClassVar[str]

    def __init__(
        self, *, verify_images: bool = True, num_threads: int | None = None, **kwargs
    ):
        """
        Args:
          verify_images: decode every image while building and skip those that
            fail. Turning it off only checks that the file exists and is not
            empty, which is faster but moves decoding errors to training time.
          num_threads: threads that read and decode images; defaults to the
            number of CPUs.
          **kwargs: passed to `tfds.core.GeneratorBasedBuilder`, such as
            `data_dir` and `file_format`.
        """
        self.verify_images = verify_images
        self.num_threads = num_threads or os.cpu_count() or 1
        self.skips = sources.SkipLog()
        super().__init__(**kwargs)

    # -- what subclasses provide ------------------------------------------------

    @abc.abstractmethod
    def _read_source(self, root: Path) -> dict[str, list[sources.SourceRecord]]:
        """Read the manual directory into records per split."""

    def _extra_features(self) -> dict[str, Any]:
        return {}

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    # -- TFDS hooks --------------------------------------------------------------

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            # The source file's encoded bytes (JPEG, PNG, ...), never re-encoded.
            "image": tfds.features.Image(),
            "image/id": tfds.features.Text(),
            "image/filename": tfds.features.Text(),
            "texts": tfds.features.Sequence(tfds.features.Text()),
            "text_ids": tfds.features.Sequence(tfds.features.Text()),
            **self._extra_features(),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if dl_manager.manual_dir is None:
            raise ValueError(
                f"{self.name} builds from local files: pass the source folder as "
                "the manual directory (DownloadConfig(manual_dir=...))."
            )
        root = Path(dl_manager.manual_dir)
        splits = self._read_source(root)
        metadata = self.info.metadata
        metadata[METADATA_KEY] = {
            "format": self.FORMAT,
            "source": str(root),
            "texts_per_record": {},
            "skipped": {},
            "skipped_ids": {},
            **self._extra_metadata(),
        }
        generators = {}
        for split, records in splits.items():
            # Missing files are cheap to find now. A split whose images are all
            # missing is left out, because TFDS cannot write an empty split.
            present = []
            for record in records:
                if record.image_path.is_file():
                    present.append(record)
                else:
                    self.skips.add(
                        split, record.id, f"missing image: {record.image_path}"
                    )
            if present:
                generators[split] = self._generate_examples(split, present)
            else:
                logger.warning(
                    "split %s has no usable records; it is not written", split
                )
        # Skips of splits that are not written, and of no split at all ("all":
        # a Karpathy image with an unknown split), are recorded now.
        for split in {entry.split for entry in self.skips.entries} - set(generators):
            self._record_skips(split)
        if not generators:
            raise ValueError(
                f"no usable records in {root}: {self.skips.counts()} skipped. "
                "Check the layout described by `python -m bt_jax.data build --help`."
            )
        return generators

    def _generate_examples(
        self, split: str, records: Sequence[sources.SourceRecord]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        counts = []
        progress = tqdm.tqdm(
            total=len(records), desc=f"{self.name} {split}", unit="image"
        )
        with (
            progress,
            concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool,
        ):
            for start in range(0, len(records), _CHUNK_SIZE):
                chunk = records[start : start + _CHUNK_SIZE]
                results = pool.map(
                    lambda record: _read_image(record.image_path, self.verify_images),
                    chunk,
                )
                for record, (data, reason) in zip(chunk, results, strict=True):
                    progress.update()
                    if reason is not None:
                        self.skips.add(split, record.id, reason)
                        continue
                    # Keys are consecutive integers, and with shuffling disabled
                    # TFDS writes them in key order: record i is counts[i].
                    yield len(counts), self._example(record, data)
                    counts.append(len(record.texts))
        metadata = self.info.metadata[METADATA_KEY]
        metadata["texts_per_record"][split] = counts
        self._record_skips(split)
        logger.info(
            "%s %s: %d images, %d texts written, %d skipped",
            self.name,
            split,
            len(counts),
            sum(counts),
            len(self.skips.for_split(split)),
        )

    def _record_skips(self, split: str) -> None:
        entries = self.skips.for_split(split)
        if entries:
            metadata = self.info.metadata[METADATA_KEY]
            metadata["skipped"][split] = self.skips.counts(split)
            metadata["skipped_ids"][split] = [[e.id, e.reason] for e in entries]

    def _example(self, record: sources.SourceRecord, data: bytes) -> dict[str, Any]:
        return {
            "image": data,
            "image/id": record.id,
            "image/filename": record.image_path.name,
            "texts": record.texts,
            "text_ids": record.text_ids,
            **record.extra,
        }


class BtCocoCaptions(_LocalBuilder):
    """COCO captions from the official annotation files and image folders."""

    FORMAT = "coco"
    DESCRIPTION = "COCO captions read from captions_{split}{year}.json files."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place annotations/captions_train2017.json (and captions_val2017.json) and
    the train2017/ and val2017/ image folders in the manual directory. Other
    years work the same way; each annotation file becomes a split.
    """

    def _read_source(self, root):
        return sources.read_coco_captions(root, self.skips)


class BtKarpathyCaptions(_LocalBuilder):
    """COCO, Flickr30K or Flickr8K captions in Karpathy's train/val/test split."""

    FORMAT = "karpathy"
    DESCRIPTION = (
        "Captions in Karpathy's split file (dataset_coco.json, "
        "dataset_flickr30k.json); splits train, restval, val and test."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place one Karpathy split file (dataset_coco.json or dataset_flickr30k.json)
    in the manual directory with the images: for COCO the folders its
    `filepath` fields name (train2014/, val2014/), for Flickr30K an images/ or
    flickr30k-images/ folder.
    """

    def _read_source(self, root):
        return sources.read_karpathy(root, self.skips)


class BtImageText(_LocalBuilder):
    """Image-text pairs from JSON Lines files, one split per file."""

    FORMAT = "jsonl"
    DESCRIPTION = 'Image-caption pairs from JSON Lines of {"image", "caption"}.'
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place train.jsonl (and val.jsonl, test.jsonl, ...) in the manual directory,
    each line an object {"image": "images/0001.jpg", "caption": "..."} with
    image paths relative to the file. Lines naming the same image are grouped.
    """

    def _read_source(self, root):
        return sources.read_jsonl(root, self.skips)


class BtVqaV2(_LocalBuilder):
    """VQA v2 questions with the answer vocabulary and soft scores."""

    FORMAT = "vqa"
    DESCRIPTION = (
        "VQA v2 with one record per image: its questions, the soft scores over "
        "the answer vocabulary, and the raw human answers."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place v2_OpenEnded_mscoco_{train,val}2014_questions.json,
    v2_mscoco_{train,val}2014_annotations.json and the train2014/ and val2014/
    image folders in the manual directory (test2015 questions and images are
    optional and have no answers).
    """

    def __init__(
        self,
        *,
        answer_vocab: Sequence[str] | None = None,
        min_answer_count: int = vqa.DEFAULT_MIN_ANSWER_COUNT,
        **kwargs,
    ):
        """
        Args:
          answer_vocab: the answers a VQA head predicts, in label order; by
            default built from the train and val annotations.
          min_answer_count: how often an answer must be the annotators'
            majority answer to enter the built vocabulary.
          **kwargs: see `_LocalBuilder`.
        """
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else None
        if self.answer_vocab is not None:
            vqa.check_answer_vocab(self.answer_vocab)
        self.min_answer_count = min_answer_count
        super().__init__(**kwargs)

    def _extra_features(self):
        return {
            "question_ids": tfds.features.Sequence(np.int64),
            "answer_counts": tfds.features.Sequence(np.int32),
            "answer_labels": tfds.features.Sequence(np.int32),
            "answer_scores": tfds.features.Sequence(np.float32),
            "answers_per_question": tfds.features.Sequence(np.int32),
            "answers": tfds.features.Sequence(tfds.features.Text()),
        }

    def _extra_metadata(self):
        return {"answer_vocab": self.answer_vocab}

    def _read_source(self, root):
        if self.answer_vocab is None:
            self.answer_vocab = vqa.build_answer_vocab(
                sources.collect_vqa_vocab_answers(root), self.min_answer_count
            )
            if not self.answer_vocab:
                raise ValueError(
                    f"no answer in {root} occurs {self.min_answer_count} times; "
                    "lower min_answer_count or pass answer_vocab."
                )
            logger.info("built a vocabulary of %d answers", len(self.answer_vocab))
        return sources.read_vqa(root, self.answer_vocab, self.skips)


BUILDERS: dict[str, type[_LocalBuilder]] = {
    builder.FORMAT: builder
    for builder in (BtCocoCaptions, BtKarpathyCaptions, BtImageText, BtVqaV2)
}
