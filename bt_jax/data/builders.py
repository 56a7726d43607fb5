"""TFDS builders that turn local files into ArrayRecord datasets.

Each builder reads a source folder (TFDS's manual directory) in one official
layout, checks every image by decoding it, and writes one record per image with
all of that image's texts (for NLVR2, one record per image pair, the second
image in `image_2`). Images are stored as the source files' encoded bytes,
unchanged. bt-jax decodes them with `bt_jax.processing.load_image`, so
training gets the same pixels as inference on the original file. Neither
building nor reading needs TensorFlow.

Records are written in source order (shuffling is disabled) so that record `i`
of a split is the `i`-th kept image; the number of texts of each record is
stored in the dataset's `metadata.json`, which lets a pipeline enumerate every
(image, text) pair without reading the images. Skipped records and texts are
counted and listed there too.

Registered names: `bt_coco_captions`, `bt_karpathy_captions`,
`bt_image_text` (JSON Lines), `bt_vqa_v2`, `bt_nlvr2` and `bt_snli_ve`.
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
# Tasks a dataset can be for, stored as metadata "task": "captions" (image-text
# pairs, for the pretraining objectives and retrieval) or a fine-tuning task.
TASKS = ("captions", "vqa", "nlvr2", "snli-ve")


# Named in the skip reasons of an NLVR2 pair's second image.
_SECOND_IMAGE = "second image of the pair, "


def _read_image(
    path: Path, verify: bool, role: str = ""
) -> tuple[bytes | None, str | None]:
    """Return `(encoded bytes, None)`, or `(None, reason)` when unusable.

    `role` goes before the path in the reason, to say which image failed.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"missing image: {role}{path}"
    except OSError as err:
        return None, f"unreadable image: {role}{path}: {err.strerror or err}"
    if not data:
        return None, f"corrupt image: {role}{path} is empty"
    if verify:
        try:
            load_image(data)
        except ImageFileError as err:
            return None, f"corrupt image: {role}{path}: {err}"
    return data, None


def _read_record_images(
    record: sources.SourceRecord, verify: bool
) -> tuple[list[bytes] | None, str | None]:
    """Return the encoded bytes of each of the record's images, or a reason."""
    images = []
    for number, path in enumerate(record.image_paths):
        data, reason = _read_image(path, verify, _SECOND_IMAGE if number else "")
        if reason is not None:
            return None, reason
        images.append(data)
    return images, None


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared generation for the local-file builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FORMAT: ClassVar[str]
    TASK: ClassVar[str] = "captions"
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

    # TFDS prints download lines to stdout around a build, but nothing is downloaded
    # here. These private hooks log the start instead, and `build` logs the end.
    def _log_download_bytes(self) -> None:
        logger.info("building %s %s in %s", self.name, self.version, self.data_dir)

    def _log_download_done(self) -> None:
        pass

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
            "task": self.TASK,
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
                missing = [p for p in record.image_paths if not p.is_file()]
                if not missing:
                    present.append(record)
                else:
                    role = "" if missing[0] == record.image_path else _SECOND_IMAGE
                    self.skips.add(
                        split, record.id, f"missing image: {role}{missing[0]}"
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
                    lambda record: _read_record_images(record, self.verify_images),
                    chunk,
                )
                for record, (images, reason) in zip(chunk, results, strict=True):
                    progress.update()
                    if reason is not None:
                        self.skips.add(split, record.id, reason)
                        continue
                    # Keys are consecutive integers, and with shuffling disabled
                    # TFDS writes them in key order: record i is counts[i].
                    yield len(counts), self._example(record, images)
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

    def _example(
        self, record: sources.SourceRecord, images: list[bytes]
    ) -> dict[str, Any]:
        example = {
            "image": images[0],
            "image/id": record.id,
            "image/filename": record.image_path.name,
            "texts": record.texts,
            "text_ids": record.text_ids,
            **record.extra,
        }
        if record.image_path_2 is not None:
            example["image_2"] = images[1]
            example["image_2/filename"] = record.image_path_2.name
        return example


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
    TASK = "vqa"
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


class BtNlvr2(_LocalBuilder):
    """NLVR2 sentences about image pairs, each labelled true or false."""

    FORMAT = "nlvr2"
    TASK = "nlvr2"
    DESCRIPTION = (
        "NLVR2 with one record per image pair: both images, their sentences and "
        "one label per sentence (1 for True, 0 for False)."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place the annotation files of github.com/lil-lab/nlvr as nlvr2/data/train.json,
    dev.json and test1.json (data/ or the manual directory itself also work),
    and the images as the NLVR2 download unpacks them:
    images/train/{directory}/train-10171-0-img0.png (the line's `directory`),
    dev/dev-0-0-img0.png and test1/test1-0-0-img0.png. The dev and test1
    folders may also sit under images/, and train images directly in
    images/train/. Each split's images are found by the sentence identifier
    without its last "-N" part, plus "-img0.png" and "-img1.png".
    """

    def _extra_features(self):
        return {
            # The pair's second image, encoded bytes as for `image`.
            "image_2": tfds.features.Image(),
            "image_2/filename": tfds.features.Text(),
            "labels": tfds.features.Sequence(np.int32),
        }

    def _extra_metadata(self):
        return {
            "label_names": sorted(sources.NLVR2_LABELS, key=sources.NLVR2_LABELS.get)
        }

    def _read_source(self, root):
        return sources.read_nlvr2(root, self.skips)


class BtSnliVe(_LocalBuilder):
    """SNLI-VE hypotheses about Flickr30K images, each with a gold label."""

    FORMAT = "snli-ve"
    TASK = "snli-ve"
    DESCRIPTION = (
        "SNLI-VE with one record per Flickr30K image: its hypotheses and one "
        "label per hypothesis (0 contradiction, 1 neutral, 2 entailment)."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place snli_ve_train.jsonl, snli_ve_dev.jsonl and snli_ve_test.jsonl, as
    github.com/necla-ml/SNLI-VE writes them, in the manual directory (or in
    its snli_ve/ or data/ folder), and the Flickr30K images as
    {Flickr30K_ID}.jpg in one of flickr30k_images/,
    flickr30k_images/flickr30k_images/, Flickr30K/flickr30k_images/,
    flickr30k-images/ or images/. Lines with gold label "-" are skipped.
    """

    def _extra_features(self):
        return {"labels": tfds.features.Sequence(np.int32)}

    def _extra_metadata(self):
        return {
            "label_names": sorted(
                sources.SNLI_VE_LABELS, key=sources.SNLI_VE_LABELS.get
            )
        }

    def _read_source(self, root):
        return sources.read_snli_ve(root, self.skips)


BUILDERS: dict[str, type[_LocalBuilder]] = {
    builder.FORMAT: builder
    for builder in (
        BtCocoCaptions,
        BtKarpathyCaptions,
        BtImageText,
        BtVqaV2,
        BtNlvr2,
        BtSnliVe,
    )
}
