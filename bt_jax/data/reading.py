"""Random access to built datasets: by directory or by registered TFDS name.

`open_records(dataset, split)` returns a `Records` sequence whose items are
plain dicts in one layout whatever the dataset: `image` (encoded bytes, not
decoded), `id`, `texts` and `text_ids` (lists of str), plus the VQA fields,
the class `labels` (NLVR2, SNLI-VE) and the second image `image_2` (NLVR2)
when present. `Records.task` names the task a split is for. bt-jax's own
builders and TFDS's `coco_captions` are recognised; other datasets name their
fields through `Fields`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from bt_jax.data.builders import BUILDERS, METADATA_KEY, TASKS

logger = logging.getLogger(__name__)

_VQA_FIELDS = (
    "question_ids",
    "answer_counts",
    "answer_labels",
    "answer_scores",
    "answers_per_question",
    "answers",
)
# One class label per text (NLVR2, SNLI-VE).
_LABEL_FIELD = "labels"
# The second image of an NLVR2 pair, left encoded like the first.
SECOND_IMAGE_FIELD = "image_2"
# Task of datasets built before the metadata stored it, by their format.
_TASK_BY_FORMAT = {format: builder.TASK for format, builder in BUILDERS.items()}


@dataclasses.dataclass(frozen=True)
class Fields:
    """Names of the features that contain a dataset's image, texts and ids.

    Paths use "/" to reach into nested features, as in TFDS's `coco_captions`
    ("captions/text"). A text field may hold one string or a list.
    """

    image: str = "image"
    texts: str = "texts"
    text_ids: str | None = "text_ids"
    id: str = "image/id"


BT_JAX_FIELDS = Fields()
COCO_CAPTIONS_FIELDS = Fields(texts="captions/text", text_ids="captions/id")


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _lookup(example: dict, path: str) -> Any:
    value: Any = example
    for key in path.split("/") if path not in example else [path]:
        value = value[key]
    return value


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):
        return list(value) if value.ndim else [value.item()]
    return [value]


def _flat_feature_names(features: tfds.features.FeaturesDict) -> set[str]:
    names = set()
    for key, feature in features.items():
        names.add(key)
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, tfds.features.FeaturesDict):
            names |= {f"{key}/{sub}" for sub in _flat_feature_names(inner)}
    return names


def detect_fields(features: tfds.features.FeaturesDict) -> Fields:
    """Return the field layout of a dataset from its features."""
    names = _flat_feature_names(features)
    for fields in (BT_JAX_FIELDS, COCO_CAPTIONS_FIELDS):
        if {fields.image, fields.texts} <= names:
            id_field = fields.id if fields.id in names else None
            return dataclasses.replace(fields, id=id_field or "")
    raise ValueError(
        f"cannot tell which features hold the image and the texts; the dataset "
        f"has {sorted(names)}. Pass fields=Fields(image=..., texts=..., id=...)."
    )


def find_dataset_dir(path: str | Path) -> Path:
    """Return the folder holding `dataset_info.json` at or below `path`.

    Accepts the version folder itself (`out/bt_image_text/1.0.0`) or any folder
    above it that contains exactly one built dataset (the `--out` of a build).
    """
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    if path.is_file():
        raise ValueError(f"{path} is a file; pass the folder of a built dataset.")
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    # TFDS writes into "incomplete.*" folders, and a rebuild keeps the old
    # dataset in a hidden ".VERSION.previous" folder until it completes.
    found = sorted(
        info.parent
        for info in path.glob("**/dataset_info.json")
        if not any(
            part.startswith(("incomplete.", "."))
            for part in info.parent.relative_to(path).parts
        )
    )
    if len(found) == 1:
        return found[0]
    if not found:
        set_aside = sorted(path.glob("**/.*.previous"))
        hint = (
            f" An interrupted rebuild left a dataset in {set_aside[0]}; run the "
            "build again to restore or replace it."
            if set_aside
            else ""
        )
        raise FileNotFoundError(
            f"no built dataset in {path} (no dataset_info.json). Build one with "
            f"`python -m bt_jax.data build`.{hint}"
        )
    listing = ", ".join(str(f) for f in found)
    raise ValueError(
        f"{path} contains several datasets ({listing}); pass the one to read."
    )


def load_metadata(dataset_dir: Path) -> dict[str, Any]:
    """Return bt-jax's metadata of a built dataset, or {} for other datasets."""
    file = Path(dataset_dir) / "metadata.json"
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as handle:
        return json.load(handle).get(METADATA_KEY, {})


def _open_builder(dataset: str | Path, data_dir: str | Path | None):
    text = str(dataset)
    # Registered names look like "coco_captions" or "coco_captions/2017".
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1
    if Path(text).expanduser().exists() or looks_like_path:
        directory = find_dataset_dir(Path(text).expanduser())
        return tfds.builder_from_directory(str(directory))
    # A registered name such as "coco_captions" or "coco_captions/2017".
    import bt_jax.data.builders  # noqa: F401  (registers bt-jax's names)

    hint = (
        f"Prepare it once with `tfds build {text} --file_format=array_record` "
        "(this downloads it, and TFDS's own builders may need TensorFlow), or "
        "build local files with `python -m bt_jax.data build`."
    )
    try:
        # A prepared dataset is read from its files, without the builder's code.
        builder = tfds.builder(text, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"{text} is neither a folder nor a registered TFDS dataset."
        ) from None
    except ImportError as err:
        raise FileNotFoundError(
            f"TFDS dataset {text} is not prepared in {data_dir or 'the default data dir'}"
            f" and its builder cannot run here ({err}). {hint}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {text} is not prepared in {builder.data_dir}. {hint}"
        )
    return builder


class Records(Sequence):
    """A split of a built dataset as `{"image", "id", "texts", "text_ids"}` dicts.

    Images stay encoded bytes; decoding is left to the caller so that a corrupt
    image fails where it can be skipped and reported.
    """

    def __init__(self, sources, fields: Fields, info, metadata, split: str):
        self._sources = list(sources)
        self._offsets = np.cumsum([0] + [len(source) for source in self._sources])
        self.fields = fields
        self.info = info
        self.metadata = metadata
        self.split = split
        self.answer_vocab: list[str] | None = metadata.get("answer_vocab")
        # Class names in label order (NLVR2, SNLI-VE); None for other tasks.
        self.label_names: list[str] | None = metadata.get("label_names")

    @property
    def task(self) -> str:
        """The task the split is for: one of "captions", "vqa", "nlvr2", "snli-ve".

        Read from bt-jax's metadata. Datasets without it, such as TFDS's
        `coco_captions`, are image-text pairs: "captions".
        """
        task = self.metadata.get("task") or _TASK_BY_FORMAT.get(
            self.metadata.get("format"), "captions"
        )
        if task not in TASKS:
            raise ValueError(
                f"the dataset's metadata names an unknown task {task!r}; bt-jax "
                f"knows {', '.join(TASKS)}. Rebuild it with `python -m "
                "bt_jax.data build`."
            )
        return task

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def raw(self, index: int) -> dict[str, Any]:
        """Return the stored example as TFDS decodes it (image left encoded)."""
        if -len(self) <= index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._sources[part][index - int(self._offsets[part])]

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.raw(index)
        texts = [
            _decode(text) for text in _as_list(_lookup(example, self.fields.texts))
        ]
        if self.fields.text_ids:
            text_ids = [
                str(_decode(i))
                for i in _as_list(_lookup(example, self.fields.text_ids))
            ]
        else:
            text_ids = [f"{index}/{n}" for n in range(len(texts))]
        record_id = (
            str(_decode(_lookup(example, self.fields.id)))
            if self.fields.id
            else str(index)
        )
        record = {
            "image": _lookup(example, self.fields.image),
            "id": record_id,
            "texts": texts,
            "text_ids": text_ids,
        }
        for name in _VQA_FIELDS:
            if name in example:
                record[name] = [_decode(value) for value in _as_list(example[name])]
        if _LABEL_FIELD in example:
            record[_LABEL_FIELD] = [int(v) for v in _as_list(example[_LABEL_FIELD])]
        if SECOND_IMAGE_FIELD in example:
            record[SECOND_IMAGE_FIELD] = example[SECOND_IMAGE_FIELD]
        return record

    def texts_per_record(self, progress: bool = True) -> list[int]:
        """Return how many texts each record holds.

        bt-jax's builders store these counts. For other datasets every record is
        read once, images included because TFDS reads whole records, which
        takes a while on large datasets.
        """
        stored = self.metadata.get("texts_per_record", {})
        splits = self.split.split("+")
        if all(split in stored for split in splits):
            counts = [count for split in splits for count in stored[split]]
            if len(counts) == len(self):
                return counts
            logger.warning(
                "stored text counts (%d) do not match the %d records; recounting",
                len(counts),
                len(self),
            )
        logger.info("counting the texts of %d records", len(self))
        counts = []
        for index in tqdm.trange(len(self), desc="count texts", disable=not progress):
            counts.append(len(_as_list(_lookup(self.raw(index), self.fields.texts))))
        return counts


def open_records(
    dataset: str | Path,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    fields: Fields | None = None,
) -> Records:
    """Open a split of a built dataset for random access.

    Args:
      dataset: a built dataset's folder, or a registered TFDS name prepared in
        `data_dir` in ArrayRecord format.
      split: a split name, or several joined by "+" ("train+restval").
      data_dir: where registered TFDS datasets live (TFDS's default if None).
      fields: the dataset's field layout; detected when None.
    """
    builder = _open_builder(dataset, data_dir)
    names = split.split("+")
    missing = [name for name in names if name not in builder.info.splits]
    if missing:
        raise ValueError(
            f"split {missing[0]!r} not in {builder.name}; it has "
            f"{sorted(builder.info.splits)}."
        )
    fields = fields or detect_fields(builder.info.features)
    decoders = {fields.image.split("/")[0]: tfds.decode.SkipDecoding()}
    if SECOND_IMAGE_FIELD in builder.info.features:
        decoders[SECOND_IMAGE_FIELD] = tfds.decode.SkipDecoding()
    try:
        parts = [builder.as_data_source(name, decoders=decoders) for name in names]
    except NotImplementedError as err:
        raise ValueError(
            f"{builder.name} is not stored as ArrayRecord, which random access "
            f"needs ({err}). Rebuild it with `--file_format=array_record`."
        ) from None
    metadata = load_metadata(Path(builder.data_dir))
    return Records(parts, fields, builder.info, metadata, split)
