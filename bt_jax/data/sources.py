"""Readers for the file layouts datasets arrive in, before they become TFDS.

Each reader turns a folder in an official layout into, per split, a list of
`SourceRecord`: one image with its texts. A record or text that cannot be used
(an invalid JSON line, an empty caption, an annotation naming an unknown
image, a duplicate id) is skipped and entered in a `SkipLog` with its id and
the reason, never dropped silently. Images are only located here; the builders
read and check them.

Layouts:
  COCO captions   annotations/captions_{split}{year}.json + {split}{year}/
  Karpathy splits dataset_{coco,flickr30k,...}.json + the image folders it names
  JSON Lines      *.jsonl with one {"image": path, "caption": text} per line
  VQA v2          v2_OpenEnded_mscoco_{split}{year}_questions.json,
                  v2_mscoco_{split}{year}_annotations.json + {split}{year}/
  NLVR2           nlvr2/data/{train,dev,test1}.json + images/train/{directory}/,
                  dev/ and test1/ (or images/dev/, images/test1/)
  SNLI-VE         snli_ve_{train,dev,test}.jsonl + flickr30k_images/ (or
                  Flickr30K/flickr30k_images/, flickr30k-images/, images/)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bt_jax.data import vqa

logger = logging.getLogger(__name__)

# Beyond this many log lines per split and reason, skips are only counted and
# listed in the dataset's metadata.
MAX_LOGGED_SKIPS = 20


@dataclasses.dataclass
class SourceRecord:
    """One image and the texts that go with it, as found in the source files."""

    id: str
    image_path: Path
    texts: list[str]
    text_ids: list[str]
    # Format-specific features, already in their stored form (VQA answers).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The second image of an NLVR2 pair; None for one-image formats.
    image_path_2: Path | None = None

    @property
    def image_paths(self) -> list[Path]:
        """The record's image files: one, or two for an NLVR2 pair."""
        paths = [self.image_path]
        if self.image_path_2 is not None:
            paths.append(self.image_path_2)
        return paths


@dataclasses.dataclass(frozen=True)
class Skip:
    split: str
    id: str
    reason: str


class SkipLog:
    """Skipped records and texts: each is logged with its id and counted."""

    def __init__(self):
        self.entries: list[Skip] = []
        self._logged = collections.Counter()

    def add(self, split: str, record_id: str, reason: str) -> None:
        self.entries.append(Skip(split, record_id, reason))
        kind = reason.split(":")[0]
        self._logged[split, kind] += 1
        if self._logged[split, kind] <= MAX_LOGGED_SKIPS:
            logger.warning("skipped %s in split %s: %s", record_id, split, reason)
        elif self._logged[split, kind] == MAX_LOGGED_SKIPS + 1:
            logger.warning(
                "more records skipped in split %s for %r; counting them without "
                "logging each one",
                split,
                kind,
            )

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Return the number of skips per reason (the text before any colon)."""
        counter = collections.Counter(
            entry.reason.split(":")[0]
            for entry in self.entries
            if split is None or entry.split == split
        )
        return dict(sorted(counter.items()))

    def for_split(self, split: str) -> list[Skip]:
        return [entry for entry in self.entries if entry.split == split]


def _read_json(path: Path) -> Any:
    # utf-8-sig also accepts files that start with a byte order mark.
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text: {err}. Save it as UTF-8."
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSON file.") from None


def _json_list(data: Any, key: str, path: Path, *, required: bool = True) -> list:
    """Return `data[key]` when it is a list; raise naming the file otherwise."""
    value = data.get(key) if isinstance(data, dict) else None
    if value is None and not required and isinstance(data, dict):
        return []
    if not isinstance(value, list):
        raise ValueError(
            f"{path} has no {key!r} list at the top level; check that it is the "
            "right file for this format."
        )
    return value


def _clean_text(value: Any) -> str | None:
    """Return the stripped text, or None when it is not a non-empty string."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text or None


def _add_text(
    record: SourceRecord, text: Any, text_id: str, split: str, skips: SkipLog
) -> None:
    if not isinstance(text, str):
        skips.add(split, text_id, f"invalid text: expected a string, got {text!r}")
        return
    cleaned = _clean_text(text)
    if cleaned is None:
        skips.add(split, text_id, "empty text")
        return
    record.texts.append(cleaned)
    record.text_ids.append(text_id)


def _drop_textless(
    records: Iterable[SourceRecord], split: str, skips: SkipLog
) -> list[SourceRecord]:
    kept = []
    for record in records:
        if record.texts:
            kept.append(record)
        else:
            skips.add(split, record.id, "no texts: every text of the image was skipped")
    return kept


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"source folder not found: {path}")
    return path


# ---------------------------------------------------------------------------
# COCO captions in the official layout.

_COCO_CAPTIONS_FILE = re.compile(r"captions_(?P<split>[a-z]+)(?P<year>\d{4})\.json")


def find_coco_caption_files(root: Path) -> dict[str, Path]:
    """Return the `captions_{split}{year}.json` files under root, by split."""
    _require_dir(root)
    found = {}
    for folder in (root, root / "annotations"):
        for path in sorted(folder.glob("captions_*.json")):
            match = _COCO_CAPTIONS_FILE.fullmatch(path.name)
            if match:
                found[match["split"]] = path
    if not found:
        raise FileNotFoundError(
            f"no COCO caption annotations in {root}: expected "
            "annotations/captions_train2017.json (or captions_{split}{year}.json) "
            "beside the train2017/ and val2017/ image folders."
        )
    return found


def read_coco_captions(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read COCO caption annotations: one record per image, all its captions."""
    splits = {}
    for split, path in find_coco_caption_files(root).items():
        year = _COCO_CAPTIONS_FILE.fullmatch(path.name)["year"]
        data = _read_json(path)
        images = _json_list(data, "images", path)
        annotations = _json_list(data, "annotations", path, required=False)
        image_dir = root / f"{split}{year}"
        records: dict[str, SourceRecord] = {}
        for entry in images:
            if (
                not isinstance(entry, dict)
                or "id" not in entry
                or not isinstance(entry.get("file_name"), str)
            ):
                skips.add(split, repr(entry)[:80], "invalid record: image entry")
                continue
            image_id = str(entry["id"])
            if image_id in records:
                skips.add(split, image_id, "duplicate id: image listed twice")
                continue
            records[image_id] = SourceRecord(
                image_id, image_dir / entry["file_name"], [], []
            )
        seen_ids = set()
        for position, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or "image_id" not in annotation:
                skips.add(split, repr(annotation)[:80], "invalid record: annotation")
                continue
            text_id = str(annotation.get("id", f"annotations[{position}]"))
            record = records.get(str(annotation["image_id"]))
            if record is None:
                skips.add(
                    split,
                    text_id,
                    f"invalid record: unknown image_id {annotation['image_id']}",
                )
                continue
            if text_id in seen_ids:
                skips.add(split, text_id, "duplicate id: caption listed twice")
                continue
            seen_ids.add(text_id)
            _add_text(record, annotation.get("caption"), text_id, split, skips)
        splits[split] = _drop_textless(records.values(), split, skips)
    return splits


# ---------------------------------------------------------------------------
# Karpathy splits (dataset_coco.json, dataset_flickr30k.json, dataset_f8k.json).

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def find_karpathy_file(root: Path) -> Path:
    _require_dir(root)
    candidates = sorted(root.glob("dataset_*.json"))
    if len(candidates) != 1:
        found = ", ".join(path.name for path in candidates) or "none"
        raise FileNotFoundError(
            f"expected exactly one Karpathy split file (dataset_coco.json, "
            f"dataset_flickr30k.json, ...) in {root}; found {found}. Put one per "
            "source folder."
        )
    return candidates[0]


def _karpathy_image_path(root: Path, entry: dict) -> Path:
    filename = entry["filename"]
    candidates = []
    if isinstance(entry.get("filepath"), str):
        candidates.append(root / entry["filepath"] / filename)
    candidates += [
        root / "images" / filename,
        root / "flickr30k-images" / filename,
        root / "Flicker8k_Dataset" / filename,
        root / filename,
    ]
    for path in candidates:
        if path.is_file():
            return path
    # Missing: the builder reports the first, most specific location.
    return candidates[0]


def read_karpathy(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read a Karpathy split file; splits are train, restval, val and test."""
    path = find_karpathy_file(root)
    images = _json_list(_read_json(path), "images", path)
    splits: dict[str, list[SourceRecord]] = {}
    seen = set()
    for position, entry in enumerate(images):
        if not isinstance(entry, dict):
            skips.add("all", f"images[{position}]", "invalid record: not an object")
            continue
        image_id = str(
            entry.get("cocoid", entry.get("imgid", entry.get("filename", position)))
        )
        if not isinstance(entry.get("filename"), str):
            skips.add("all", image_id, "invalid record: no filename")
            continue
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            skips.add("all", image_id, f"invalid record: unknown split {split!r}")
            continue
        if image_id in seen:
            skips.add(split, image_id, "duplicate id: image listed twice")
            continue
        seen.add(image_id)
        record = SourceRecord(image_id, _karpathy_image_path(root, entry), [], [])
        sentences = entry.get("sentences", [])
        for number, sentence in enumerate(
            sentences if isinstance(sentences, list) else []
        ):
            if not isinstance(sentence, dict):
                skips.add(split, f"{image_id}/{number}", "invalid record: sentence")
                continue
            text_id = str(sentence.get("sentid", f"{image_id}/{number}"))
            _add_text(record, sentence.get("raw"), text_id, split, skips)
        splits.setdefault(split, []).append(record)
    return {
        split: _drop_textless(splits[split], split, skips)
        for split in KARPATHY_SPLITS
        if split in splits
    }


# ---------------------------------------------------------------------------
# JSON Lines of {"image": path, "caption": text}.


# TFDS split names are word characters only, and "all" is reserved.
_SPLIT_NAME = re.compile(r"\w+")


def find_jsonl_files(root: Path) -> dict[str, Path]:
    """Return the JSON Lines files in root, keyed by split (the file's stem)."""
    _require_dir(root)
    files = {path.stem: path for path in sorted(root.glob("*.jsonl"))}
    if not files:
        raise FileNotFoundError(
            f"no .jsonl files in {root}: expected for example train.jsonl with one "
            '{"image": "images/1.jpg", "caption": "..."} object per line. Each '
            "file becomes the split named after it."
        )
    for split, path in files.items():
        if not _SPLIT_NAME.fullmatch(split) or split == "all":
            raise ValueError(
                f"{path.name} cannot name a split: split names use letters, digits "
                "and underscores, and 'all' is reserved. Rename the file, for "
                "example to train.jsonl."
            )
        if not path.is_file():
            raise ValueError(f"{path} is not a file.")
    return files


def _read_jsonl_line(raw: bytes, line_id: str, split: str, skips: SkipLog):
    """Return the parsed object of one line, or None after logging a skip."""
    try:
        line = raw.decode("utf-8-sig" if line_id.endswith(":1") else "utf-8")
    except UnicodeDecodeError as err:
        skips.add(split, line_id, f"invalid record: not UTF-8 ({err.reason})")
        return None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        skips.add(split, line_id, f"invalid record: not JSON ({err.msg})")
        return None


def read_jsonl(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read JSON Lines files; lines naming the same image share one record.

    Each line has "image" (a path relative to the file's folder, or absolute)
    and "caption" (or a "captions" list), and optionally "id", the caption's
    id (by default FILE:LINE). A repeated id or a repeated (image, caption)
    line is skipped as a duplicate.
    """
    splits = {}
    for split, path in find_jsonl_files(root).items():
        records: dict[Path, SourceRecord] = {}
        seen_ids: set[str] = set()
        seen_pairs: set[tuple[Path, str]] = set()
        with open(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                line_id = f"{path.name}:{number}"
                entry = _read_jsonl_line(raw, line_id, split, skips)
                if entry is None:
                    continue
                if not isinstance(entry, dict) or not isinstance(
                    entry.get("image"), str
                ):
                    skips.add(split, line_id, 'invalid record: no "image" path')
                    continue
                captions = entry.get("captions", entry.get("caption"))
                if captions is None:
                    skips.add(split, line_id, 'invalid record: no "caption"')
                    continue
                text_id = str(entry.get("id", line_id))
                if text_id in seen_ids:
                    skips.add(split, f"{text_id} ({line_id})", "duplicate id")
                    continue
                seen_ids.add(text_id)
                image_path = (path.parent / entry["image"]).resolve()
                record = records.get(image_path)
                if record is None:
                    record = SourceRecord(entry["image"], image_path, [], [])
                    records[image_path] = record
                caption_list = captions if isinstance(captions, list) else [captions]
                for offset, caption in enumerate(caption_list):
                    caption_id = (
                        f"{text_id}/{offset}" if isinstance(captions, list) else text_id
                    )
                    key = (
                        image_path,
                        caption.strip() if isinstance(caption, str) else "",
                    )
                    if key in seen_pairs and key[1]:
                        skips.add(
                            split,
                            caption_id,
                            "duplicate record: same image and caption",
                        )
                        continue
                    seen_pairs.add(key)
                    _add_text(record, caption, caption_id, split, skips)
        splits[split] = _drop_textless(records.values(), split, skips)
    return splits


# ---------------------------------------------------------------------------
# VQA v2.

_VQA_QUESTIONS_FILE = re.compile(
    r"v2_OpenEnded_mscoco_(?P<split>[a-z-]+)(?P<year>\d{4})_questions\.json"
)
# test-dev questions use the test images.
_VQA_IMAGE_SPLIT = {"test-dev": "test"}


def find_vqa_files(root: Path) -> dict[str, tuple[Path, Path | None, str]]:
    """Return, per split, the questions file, the annotations file or None, and
    the image folder name."""
    _require_dir(root)
    found = {}
    for folder in (root, root / "annotations", root / "questions"):
        for path in sorted(folder.glob("v2_OpenEnded_mscoco_*_questions.json")):
            match = _VQA_QUESTIONS_FILE.fullmatch(path.name)
            if not match:
                continue
            split, year = match["split"], match["year"]
            name = f"v2_mscoco_{split}{year}_annotations.json"
            annotations = next(
                (
                    candidate / name
                    for candidate in (root, root / "annotations", root / "questions")
                    if (candidate / name).is_file()
                ),
                None,
            )
            image_dir = f"{_VQA_IMAGE_SPLIT.get(split, split)}{year}"
            if annotations is None and split in ("train", "val"):
                logger.warning(
                    "no %s for %s: its questions get no answers and the answer "
                    "vocabulary is built without it",
                    name,
                    path.name,
                )
            found[split.replace("-", "_")] = (path, annotations, image_dir)
    if not found:
        raise FileNotFoundError(
            f"no VQA v2 question files in {root}: expected "
            "v2_OpenEnded_mscoco_train2014_questions.json with "
            "v2_mscoco_train2014_annotations.json and the train2014/ image folder."
        )
    return found


def collect_vqa_vocab_answers(root: Path) -> list[str]:
    """Return every multiple_choice_answer of the train and val annotations."""
    answers = []
    files = find_vqa_files(root)
    # Train first, then val: the vocabulary is numbered by first appearance.
    for split in ("train", "val"):
        annotations_path = files.get(split, (None, None, None))[1]
        if annotations_path is not None:
            listed = _json_list(
                _read_json(annotations_path), "annotations", annotations_path
            )
            for annotation in listed:
                if isinstance(annotation, dict) and isinstance(
                    annotation.get("multiple_choice_answer"), str
                ):
                    answers.append(annotation["multiple_choice_answer"])
    return answers


def read_vqa(
    root: Path, answer_vocab: list[str], skips: SkipLog
) -> dict[str, list[SourceRecord]]:
    """Read VQA v2 questions (and annotations where given): one record per image.

    Each record's `extra` has flat per-question lists: `question_ids`, the
    soft targets (`answer_counts` labels per question, then `answer_labels`
    and `answer_scores`), and the raw human answers (`answers_per_question`
    strings per question, then `answers`).
    """
    answer_index = {answer: i for i, answer in enumerate(answer_vocab)}
    splits = {}
    for split, (questions_path, annotations_path, image_dir) in find_vqa_files(
        root
    ).items():
        questions = _json_list(_read_json(questions_path), "questions", questions_path)
        by_question = {}
        if annotations_path is not None:
            listed = _json_list(
                _read_json(annotations_path), "annotations", annotations_path
            )
            for annotation in listed:
                if isinstance(annotation, dict) and "question_id" in annotation:
                    by_question[annotation["question_id"]] = annotation
        records: dict[str, SourceRecord] = {}
        seen = set()
        for entry in questions:
            if not isinstance(entry, dict) or not {"question_id", "image_id"} <= set(
                entry
            ):
                skips.add(split, repr(entry)[:80], "invalid record: question")
                continue
            question_id = entry["question_id"]
            if not isinstance(question_id, int):
                skips.add(split, str(question_id), "invalid record: question_id")
                continue
            if not isinstance(entry["image_id"], int):
                skips.add(split, str(question_id), "invalid record: image_id")
                continue
            if question_id in seen:
                skips.add(
                    split, str(question_id), "duplicate id: question listed twice"
                )
                continue
            if not isinstance(entry.get("question"), str):
                skips.add(
                    split, str(question_id), "invalid text: question is not a string"
                )
                continue
            question = _clean_text(entry["question"])
            if question is None:
                skips.add(split, str(question_id), "empty text")
                continue
            human_answers: list[str] = []
            if annotations_path is not None:
                annotation = by_question.get(question_id)
                raw = annotation.get("answers") if annotation else None
                if not isinstance(raw, list) or not all(
                    isinstance(item, dict) and isinstance(item.get("answer"), str)
                    for item in raw
                ):
                    skips.add(
                        split, str(question_id), "invalid record: no valid annotation"
                    )
                    continue
                human_answers = [item["answer"] for item in raw]
            seen.add(question_id)
            image_id = str(entry["image_id"])
            record = records.get(image_id)
            if record is None:
                path = (
                    root / image_dir / f"COCO_{image_dir}_{entry['image_id']:012d}.jpg"
                )
                record = SourceRecord(
                    image_id,
                    path,
                    [],
                    [],
                    {
                        "question_ids": [],
                        "answer_counts": [],
                        "answer_labels": [],
                        "answer_scores": [],
                        "answers_per_question": [],
                        "answers": [],
                    },
                )
                records[image_id] = record
            labels, scores = vqa.soft_targets(human_answers, answer_index)
            record.texts.append(question)
            record.text_ids.append(str(question_id))
            extra = record.extra
            extra["question_ids"].append(question_id)
            extra["answer_counts"].append(len(labels))
            extra["answer_labels"] += labels
            extra["answer_scores"] += scores
            extra["answers_per_question"].append(len(human_answers))
            extra["answers"] += human_answers
        splits[split] = list(records.values())
    return splits


def _read_json_lines(path: Path, split: str, skips: SkipLog):
    """Yield `(line_id, object)` for each parsed line of a JSON Lines file."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            line_id = f"{path.name}:{number}"
            entry = _read_jsonl_line(raw, line_id, split, skips)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                skips.add(split, line_id, "invalid record: not a JSON object")
                continue
            yield line_id, entry


def _add_labeled_text(
    record: SourceRecord,
    text: Any,
    text_id: str,
    label: int,
    split: str,
    skips: SkipLog,
) -> None:
    """Add a text with its class label to `extra["labels"]`, unless it is skipped."""
    before = len(record.texts)
    _add_text(record, text, text_id, split, skips)
    if len(record.texts) > before:
        record.extra["labels"].append(label)


# ---------------------------------------------------------------------------
# NLVR2: nlvr2/data/{split}.json (JSON Lines) + one image pair per identifier.

NLVR2_SPLITS = ("train", "dev", "test1", "test2")
# microsoft/BridgeTower `src/datasets/nlvr2_dataset.py` turns the label string
# into the target `answers == "True"`, so "True" is class 1 and "False" class 0.
NLVR2_LABELS = {"False": 0, "True": 1}
# "train-10171-0-0": sentence 0 about the pair "train-10171-0", whose images
# are "train-10171-0-img0.png" and "train-10171-0-img1.png".
_NLVR2_IDENTIFIER = re.compile(r"(?P<pair>[\w-]+)-\d+")
_FOLDER_NAME = re.compile(r"\w+")


def find_nlvr2_files(root: Path) -> dict[str, Path]:
    """Return the NLVR2 `{split}.json` files under root, by split."""
    _require_dir(root)
    found = {}
    for folder in (root / "nlvr2" / "data", root / "data", root):
        for split in NLVR2_SPLITS:
            path = folder / f"{split}.json"
            if path.is_file():
                found.setdefault(split, path)
    if not found:
        raise FileNotFoundError(
            f"no NLVR2 annotations in {root}: expected nlvr2/data/train.json (and "
            "dev.json, test1.json) as in github.com/lil-lab/nlvr, beside the "
            "images/train/, dev/ and test1/ image folders."
        )
    return found


def _nlvr2_image_folder(
    root: Path, split: str, directory: str | None, pair_id: str
) -> Path:
    """Return the folder with the pair's images, or the first place looked."""
    folders = []
    for base in (root / "images" / split, root / split):
        if directory is not None:
            folders.append(base / directory)
        folders.append(base)
    for folder in folders:
        if (folder / f"{pair_id}-img0.png").is_file():
            return folder
    for folder in folders:
        if (folder / f"{pair_id}-img1.png").is_file():
            return folder
    return folders[0]


def _nlvr2_label(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return NLVR2_LABELS.get(value.strip())
    return None


def read_nlvr2(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read NLVR2 annotations: one record per image pair, all its sentences.

    Each line of `{split}.json` is one sentence with its `identifier`,
    `sentence`, `label` ("True" or "False", stored as 1 or 0 in
    `extra["labels"]`) and, in train, the `directory` of the pair's images.
    The records' `image_path` and `image_path_2` are the pair's `-img0.png`
    and `-img1.png`.
    """
    splits = {}
    for split, path in find_nlvr2_files(root).items():
        records: dict[str, SourceRecord] = {}
        seen: set[str] = set()
        for line_id, entry in _read_json_lines(path, split, skips):
            identifier = entry.get("identifier")
            match = (
                _NLVR2_IDENTIFIER.fullmatch(identifier)
                if isinstance(identifier, str)
                else None
            )
            if match is None:
                skips.add(
                    split,
                    line_id,
                    f"invalid record: identifier {identifier!r} is not like "
                    "'train-10171-0-0'",
                )
                continue
            if identifier in seen:
                skips.add(split, f"{identifier} ({line_id})", "duplicate id")
                continue
            seen.add(identifier)
            label = _nlvr2_label(entry.get("label"))
            if label is None:
                skips.add(
                    split,
                    identifier,
                    f"invalid label: expected 'True' or 'False', got "
                    f"{entry.get('label')!r}",
                )
                continue
            pair_id = match["pair"]
            record = records.get(pair_id)
            if record is None:
                directory = entry.get("directory")
                directory = None if directory is None else str(directory)
                if directory is not None and not _FOLDER_NAME.fullmatch(directory):
                    skips.add(
                        split,
                        identifier,
                        f"invalid record: directory {directory!r} is not a folder "
                        "number",
                    )
                    continue
                folder = _nlvr2_image_folder(root, split, directory, pair_id)
                record = SourceRecord(
                    pair_id,
                    folder / f"{pair_id}-img0.png",
                    [],
                    [],
                    {"labels": []},
                    image_path_2=folder / f"{pair_id}-img1.png",
                )
                records[pair_id] = record
            _add_labeled_text(
                record, entry.get("sentence"), identifier, label, split, skips
            )
        splits[split] = _drop_textless(records.values(), split, skips)
    return splits


# ---------------------------------------------------------------------------
# SNLI-VE: snli_ve_{split}.jsonl + Flickr30K images named {Flickr30K_ID}.jpg.

_SNLI_VE_FILE = re.compile(r"snli_ve_(?P<split>\w+)\.jsonl")
# microsoft/BridgeTower `src/utils/write_snli.py` numbers the gold labels with
# label2id = {'contradiction': 0, 'neutral': 1, 'entailment': 2}; converted
# original checkpoints predict classes in this order.
SNLI_VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
# SNLI marks a pair whose annotators reached no majority with gold label "-".
SNLI_VE_NO_CONSENSUS = "-"
SNLI_VE_IMAGE_FOLDERS = (
    "flickr30k_images",
    "flickr30k_images/flickr30k_images",
    "Flickr30K/flickr30k_images",
    "flickr30k-images",
    "images",
)
_FLICKR30K_ID = re.compile(r"[\w-]+")


def find_snli_ve_files(root: Path) -> dict[str, Path]:
    """Return the `snli_ve_{split}.jsonl` files under root, by split."""
    _require_dir(root)
    found = {}
    for folder in (root, root / "snli_ve", root / "data"):
        for path in sorted(folder.glob("snli_ve_*.jsonl")):
            match = _SNLI_VE_FILE.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(match["split"], path)
    if not found:
        raise FileNotFoundError(
            f"no SNLI-VE annotations in {root}: expected snli_ve_train.jsonl (and "
            "snli_ve_dev.jsonl, snli_ve_test.jsonl) as github.com/necla-ml/SNLI-VE "
            "writes them, beside a flickr30k_images/ folder of Flickr30K images."
        )
    return found


def find_flickr30k_folders(root: Path) -> list[Path]:
    """Return the Flickr30K image folders under root, in the order searched."""
    folders = [root / name for name in SNLI_VE_IMAGE_FOLDERS]
    present = [folder for folder in folders if folder.is_dir()]
    if not present:
        raise FileNotFoundError(
            f"no Flickr30K image folder in {root}: expected the images as "
            f"{{Flickr30K_ID}}.jpg in one of {', '.join(SNLI_VE_IMAGE_FOLDERS)}."
        )
    return present


def _flickr30k_image(folders: list[Path], image_id: str) -> Path:
    for folder in folders:
        path = folder / f"{image_id}.jpg"
        if path.is_file():
            return path
    # Missing: the builder reports the first folder's path.
    return folders[0] / f"{image_id}.jpg"


def read_snli_ve(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read SNLI-VE: one record per Flickr30K image, all its hypotheses.

    The texts are the hypotheses (`sentence2`), their ids the `pairID`s, and
    `extra["labels"]` has each one's gold label as a `SNLI_VE_LABELS` class.
    Pairs with gold label "-" (no majority among the annotators) are skipped.
    """
    folders = find_flickr30k_folders(root)
    splits = {}
    for split, path in find_snli_ve_files(root).items():
        records: dict[str, SourceRecord] = {}
        seen: set[str] = set()
        for line_id, entry in _read_json_lines(path, split, skips):
            text_id = str(entry.get("pairID", line_id))
            if text_id in seen:
                skips.add(split, f"{text_id} ({line_id})", "duplicate id")
                continue
            seen.add(text_id)
            image_id = entry.get("Flickr30K_ID")
            image_id = str(image_id) if isinstance(image_id, (str, int)) else None
            if image_id is None or not _FLICKR30K_ID.fullmatch(image_id):
                skips.add(
                    split,
                    text_id,
                    f"invalid record: Flickr30K_ID {entry.get('Flickr30K_ID')!r}",
                )
                continue
            gold_label = entry.get("gold_label")
            if gold_label == SNLI_VE_NO_CONSENSUS:
                skips.add(split, text_id, "no gold label: the annotators did not agree")
                continue
            label = (
                SNLI_VE_LABELS.get(gold_label) if isinstance(gold_label, str) else None
            )
            if label is None:
                skips.add(
                    split,
                    text_id,
                    f"invalid label: expected one of {sorted(SNLI_VE_LABELS)}, "
                    f"got {gold_label!r}",
                )
                continue
            record = records.get(image_id)
            if record is None:
                record = SourceRecord(
                    image_id,
                    _flickr30k_image(folders, image_id),
                    [],
                    [],
                    {"labels": []},
                )
                records[image_id] = record
            _add_labeled_text(
                record, entry.get("sentence2"), text_id, label, split, skips
            )
        splits[split] = _drop_textless(records.values(), split, skips)
    return splits
