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
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None


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
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(
                f"{path} has no 'images' list; it is not a COCO captions file."
            )
        image_dir = root / f"{split}{year}"
        records: dict[str, SourceRecord] = {}
        for entry in data["images"]:
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
        for position, annotation in enumerate(data.get("annotations", [])):
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
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} has no 'images' list; it is not a Karpathy file.")
    splits: dict[str, list[SourceRecord]] = {}
    seen = set()
    for position, entry in enumerate(data["images"]):
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
    return files


def read_jsonl(root: Path, skips: SkipLog) -> dict[str, list[SourceRecord]]:
    """Read JSON Lines files; lines naming the same image share one record.

    Each line has "image" (a path relative to the file's folder, or absolute)
    and "caption" (or a "captions" list), and optionally "id" for the caption.
    """
    splits = {}
    for split, path in find_jsonl_files(root).items():
        records: dict[str, SourceRecord] = {}
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                line_id = f"{path.name}:{number}"
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    skips.add(split, line_id, f"invalid record: not JSON ({err.msg})")
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
                image = entry["image"]
                record = records.get(image)
                if record is None:
                    record = SourceRecord(image, path.parent / image, [], [])
                    records[image] = record
                caption_list = captions if isinstance(captions, list) else [captions]
                for offset, caption in enumerate(caption_list):
                    text_id = str(entry.get("id", line_id))
                    if isinstance(captions, list):
                        text_id = f"{text_id}/{offset}"
                    _add_text(record, caption, text_id, split, skips)
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
                    for candidate in (root, root / "annotations")
                    if (candidate / name).is_file()
                ),
                None,
            )
            image_dir = f"{_VQA_IMAGE_SPLIT.get(split, split)}{year}"
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
            for annotation in _read_json(annotations_path).get("annotations", []):
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
        questions = _read_json(questions_path)
        if not isinstance(questions, dict) or not isinstance(
            questions.get("questions"), list
        ):
            raise ValueError(f"{questions_path} has no 'questions' list.")
        by_question = {}
        if annotations_path is not None:
            for annotation in _read_json(annotations_path).get("annotations", []):
                if isinstance(annotation, dict) and "question_id" in annotation:
                    by_question[annotation["question_id"]] = annotation
        records: dict[str, SourceRecord] = {}
        seen = set()
        for entry in questions["questions"]:
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
            question = _clean_text(entry.get("question"))
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
