"""Source folders in the official dataset layouts, written from the sample photos.

Each `write_*_source` function writes one format (COCO captions, Karpathy
splits, JSON Lines, VQA v2) under a folder from the real sample photos that
`bt_jax.samples.materialize` provides. It returns what a correct build must
read back: per split, the records in source order with the image file's bytes,
the stripped texts and their ids. The expected values are derived from the data
written here, never from `bt_jax.data`, so tests can compare the two.

Captions at position 1 of each image are written with surrounding whitespace,
and the captions of a split are interleaved across its images as in the real
annotation files, so a build has to strip and group them.

`write_nlvr2_fixture` and `write_snli_ve_fixture` write the labelled tasks
NLVR2 and SNLI-VE from small random images instead, optionally with faulty
lines and files, and return a `TaskSource`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from bt_jax import samples


@dataclasses.dataclass(frozen=True)
class Photo:
    """A sample photo materialised on disk with its captions."""

    name: str
    path: Path
    captions: tuple[str, ...]

    @property
    def suffix(self) -> str:
        return self.path.suffix


@dataclasses.dataclass
class ExpectedRecord:
    """One record as a correct build stores it."""

    id: str
    image: bytes
    texts: list[str]
    text_ids: list[str]
    # VQA fields that are copied from the source (question ids, raw answers).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


Expected = dict[str, list[ExpectedRecord]]


def materialize_photos(directory: Path) -> dict[str, Photo]:
    """Write the sample photos with `bt_jax.samples.materialize` and read them.

    Returns the photos by sample id, with their captions in file order.
    """
    captions_file = samples.materialize(directory)
    paths: dict[str, Path] = {}
    captions: dict[str, list[str]] = {}
    for line in captions_file.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        paths[entry["photo"]] = captions_file.parent / entry["image"]
        captions.setdefault(entry["photo"], []).append(entry["caption"])
    return {name: Photo(name, paths[name], tuple(captions[name])) for name in captions}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def copy_photo(photo: Photo, target: Path) -> bytes:
    """Copy the photo's file to `target` and return its bytes."""
    data = photo.path.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return data


def write_truncated_jpeg(photo: Photo, target: Path) -> None:
    """Write the first half of a JPEG photo, which PIL cannot decode."""
    data = photo.path.read_bytes()
    assert data[:2] == b"\xff\xd8", f"{photo.path} is not a JPEG"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])


def write_empty_file(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"")


def write_text_file(target: Path) -> None:
    """Write plain text under an image file name such as `photo.jpg`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("this is a text file, not an image\n", encoding="utf-8")


def padded(caption: str, position: int) -> str:
    """Return the caption as a source file stores it at this position."""
    return f"  {caption}\t\n" if position == 1 else caption


def interleaved(
    items: list[tuple[str, Photo]],
) -> list[tuple[str, Photo, int, str]]:
    """Return `(key, photo, position, caption)` round-robin over the photos.

    The first captions of every photo come first, then the second ones, and so
    on, as annotation files list them unsorted.
    """
    rows = []
    longest = max(len(photo.captions) for _, photo in items)
    for position in range(longest):
        for key, photo in items:
            if position < len(photo.captions):
                rows.append((key, photo, position, photo.captions[position]))
    return rows


def _image_size(path: Path) -> tuple[int, int]:
    with PIL.Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------------------
# COCO captions: annotations/captions_{split}2017.json + {split}2017/.

COCO_SPLITS = {
    "train": [("microaneurysms", 391895), ("coins", 522418), ("text", 184613)],
    "val": [("clock", 397133), ("brick", 37777)],
}


def write_coco_source(root: Path, photos: dict[str, Photo]) -> Expected:
    """Write COCO 2017 caption annotations and image folders under root."""
    expected: Expected = {}
    annotation_id = 700000
    for split, entries in COCO_SPLITS.items():
        images, records = [], {}
        for name, image_id in entries:
            photo = photos[name]
            file_name = f"{image_id:012d}{photo.suffix}"
            data = copy_photo(photo, root / f"{split}2017" / file_name)
            width, height = _image_size(photo.path)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "height": height,
                    "width": width,
                    "id": image_id,
                }
            )
            records[image_id] = ExpectedRecord(str(image_id), data, [], [])
        annotations = []
        items = [(str(image_id), photos[name]) for name, image_id in entries]
        for key, _, position, caption in interleaved(items):
            annotation_id += 1
            annotations.append(
                {
                    "image_id": int(key),
                    "id": annotation_id,
                    "caption": padded(caption, position),
                }
            )
            records[int(key)].texts.append(caption.strip())
            records[int(key)].text_ids.append(str(annotation_id))
        write_json(
            root / "annotations" / f"captions_{split}2017.json",
            {
                "info": {"description": "bt-jax test fixture", "year": 2017},
                "licenses": [{"id": 1, "name": "see bt_jax.samples"}],
                "images": images,
                "annotations": annotations,
            },
        )
        expected[split] = list(records.values())
    return expected


# ---------------------------------------------------------------------------
# Karpathy split files: dataset_coco.json and dataset_flickr30k.json.

# (sample id, COCO id, split, folder) in file order. The splits are
# interleaved, as in the real file.
KARPATHY_COCO_IMAGES = [
    ("microaneurysms", 391895, "train", "train2014"),
    ("clock", 397133, "val", "val2014"),
    ("text", 184613, "restval", "val2014"),
    ("coins", 522418, "train", "train2014"),
    ("brick", 37777, "test", "val2014"),
]
# (sample id, Flickr id, split) in file order.
KARPATHY_FLICKR_IMAGES = [
    ("coins", 1000092795, "train"),
    ("brick", 10002456, "test"),
    ("microaneurysms", 1000268201, "val"),
    ("text", 1000344755, "train"),
]


def _tokens(caption: str) -> list[str]:
    return [word.strip(".,").lower() for word in caption.split()]


def _karpathy_entry(
    photo: Photo, filename: str, imgid: int, split: str, first_sentid: int
) -> dict[str, Any]:
    sentences = [
        {
            "tokens": _tokens(caption),
            "raw": padded(caption, position),
            "imgid": imgid,
            "sentid": first_sentid + position,
        }
        for position, caption in enumerate(photo.captions)
    ]
    return {
        "filename": filename,
        "imgid": imgid,
        "sentences": sentences,
        "split": split,
        "sentids": [sentence["sentid"] for sentence in sentences],
    }


def write_karpathy_coco_source(root: Path, photos: dict[str, Photo]) -> Expected:
    """Write dataset_coco.json with its train2014/ and val2014/ images."""
    entries = []
    expected: Expected = {}
    sentid = 0
    for imgid, (name, cocoid, split, folder) in enumerate(KARPATHY_COCO_IMAGES):
        photo = photos[name]
        filename = f"COCO_{folder}_{cocoid:012d}{photo.suffix}"
        data = copy_photo(photo, root / folder / filename)
        entry = _karpathy_entry(photo, filename, imgid, split, sentid)
        entry = {"filepath": folder, "cocoid": cocoid, **entry}
        entries.append(entry)
        expected.setdefault(split, []).append(
            ExpectedRecord(
                str(cocoid),
                data,
                [caption.strip() for caption in photo.captions],
                [str(sentid + n) for n in range(len(photo.captions))],
            )
        )
        sentid += len(photo.captions)
    write_json(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    return expected


def write_karpathy_flickr_source(root: Path, photos: dict[str, Photo]) -> Expected:
    """Write dataset_flickr30k.json with its flickr30k-images/ folder.

    The Flickr30K file has neither `filepath` nor `cocoid`, so a record's id is
    its `imgid`.
    """
    entries = []
    expected: Expected = {}
    sentid = 0
    for imgid, (name, flickr_id, split) in enumerate(KARPATHY_FLICKR_IMAGES):
        photo = photos[name]
        filename = f"{flickr_id}{photo.suffix}"
        data = copy_photo(photo, root / "flickr30k-images" / filename)
        entries.append(_karpathy_entry(photo, filename, imgid, split, sentid))
        expected.setdefault(split, []).append(
            ExpectedRecord(
                str(imgid),
                data,
                [caption.strip() for caption in photo.captions],
                [str(sentid + n) for n in range(len(photo.captions))],
            )
        )
        sentid += len(photo.captions)
    write_json(
        root / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"}
    )
    return expected


# ---------------------------------------------------------------------------
# JSON Lines: {split}.jsonl with {"image", "caption", "id"} per line.

JSONL_SPLITS = {
    "train": ["microaneurysms", "coins", "text"],
    "val": ["clock", "brick"],
}


def write_jsonl_source(root: Path, photos: dict[str, Photo]) -> Expected:
    """Write train.jsonl and val.jsonl, one caption per line, and images/."""
    expected: Expected = {}
    for split, names in JSONL_SPLITS.items():
        records: dict[str, ExpectedRecord] = {}
        lines = []
        for name in names:
            image = f"images/{photos[name].path.name}"
            data = copy_photo(photos[name], root / image)
            records[image] = ExpectedRecord(image, data, [], [])
        items = [(f"images/{photos[name].path.name}", photos[name]) for name in names]
        for image, photo, position, caption in interleaved(items):
            caption_id = f"{photo.name}-{position}"
            entry = {"image": image, "caption": padded(caption, position)}
            lines.append(json.dumps({**entry, "id": caption_id}) + "\n")
            records[image].texts.append(caption.strip())
            records[image].text_ids.append(caption_id)
        (root / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        expected[split] = list(records.values())
    return expected


# ---------------------------------------------------------------------------
# VQA v2: questions and annotations per split, COCO_{folder}_{id:012d}.jpg.


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int
    image_id: int
    question: str
    # The annotators' majority answer, and their 10 answers (None for test).
    multiple_choice_answer: str | None = None
    answers: tuple[str, ...] | None = None


VQA_IMAGES = {
    "train2014": [("rocket", 9), ("retina", 25)],
    "val2014": [("hubble_deep_field", 42)],
    "test2015": [("rocket", 7)],
}
VQA_QUESTIONS = {
    "train": [
        Question(
            90,
            9,
            "How many rockets are there?",
            "Two",
            ("2", "two", "Two", "2", "3", "three", "3", "1", "2", "two"),
        ),
        Question(
            250,
            25,
            "Is this a photo of an eye?",
            "yes",
            ("yes",) * 7 + ("no", "no", "maybe"),
        ),
        Question(
            91,
            9,
            "  How many engines are visible?\n",
            "2",
            ("2", "2", "two", "4", "four", "4", "4", "several", "2 engines", "3"),
        ),
        Question(
            251,
            25,
            "Is the image in black and white?",
            "no",
            ("no", "no", "No", "no.", "yes", "no", "No!", "yes", "nope", "no"),
        ),
    ],
    "val": [
        Question(
            420,
            42,
            "Is this outer space?",
            "yes!",
            ("yes", "yes", "yes!", "Yes", "yes", "yes", "yes", "yes", "no", "yes"),
        ),
        Question(
            421,
            42,
            "How many bright stars are there?",
            "two",
            ("two", "2", "3", "many", "10", "ten", "2", "1", "one", "none"),
        ),
        Question(422, 42, "Is it daytime?", "no", ("no",) * 10),
        Question(
            423,
            42,
            "What animal is shown?",
            "the dog.",
            (
                "the dog.",
                "dog",
                "a dog",
                "Dog",
                "cat",
                "no animal",
                "none",
                "dog",
                "dogs",
                "dog!",
            ),
        ),
    ],
    "test": [Question(70, 7, "What is this?")],
    "test-dev": [Question(71, 7, "What is in the sky?")],
}
# Split of the questions file -> image folder.
VQA_FOLDERS = {
    "train": "train2014",
    "val": "val2014",
    "test": "test2015",
    "test-dev": "test2015",
}


def vqa_file_names(split: str) -> tuple[str, str]:
    """Return the questions and annotations file names of a VQA v2 split."""
    year = VQA_FOLDERS[split][-4:]
    return (
        f"v2_OpenEnded_mscoco_{split}{year}_questions.json",
        f"v2_mscoco_{split}{year}_annotations.json",
    )


def vqa_question_entry(question: Question) -> dict[str, Any]:
    return {
        "image_id": question.image_id,
        "question": question.question,
        "question_id": question.question_id,
    }


def vqa_annotation_entry(question: Question) -> dict[str, Any]:
    answers = question.answers or ()
    return {
        "question_type": "how many",
        "multiple_choice_answer": question.multiple_choice_answer,
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": n + 1}
            for n, answer in enumerate(answers)
        ],
        "image_id": question.image_id,
        "answer_type": "other",
        "question_id": question.question_id,
    }


def write_vqa_source(root: Path, photos: dict[str, Photo]) -> Expected:
    """Write VQA v2 questions, annotations (not for test splits) and images.

    The expected records carry the source's question ids and raw answers in
    `extra`. The soft scores depend on the answer vocabulary, so the tests
    compute them.
    """
    image_bytes = {}
    for folder, entries in VQA_IMAGES.items():
        for name, image_id in entries:
            target = root / folder / f"COCO_{folder}_{image_id:012d}.jpg"
            image_bytes[folder, image_id] = copy_photo(photos[name], target)
    expected: Expected = {}
    info = {"description": "bt-jax test fixture", "version": "2.0"}
    for split, questions in VQA_QUESTIONS.items():
        questions_file, annotations_file = vqa_file_names(split)
        subtype = f"{split}{VQA_FOLDERS[split][-4:]}"
        write_json(
            root / questions_file,
            {
                "info": info,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": subtype,
                "questions": [vqa_question_entry(q) for q in questions],
            },
        )
        if questions[0].answers is not None:
            write_json(
                root / annotations_file,
                {
                    "info": info,
                    "data_type": "mscoco",
                    "data_subtype": subtype,
                    "annotations": [vqa_annotation_entry(q) for q in questions],
                },
            )
        folder = VQA_FOLDERS[split]
        records: dict[int, ExpectedRecord] = {}
        for question in questions:
            record = records.get(question.image_id)
            if record is None:
                record = ExpectedRecord(
                    str(question.image_id),
                    image_bytes[folder, question.image_id],
                    [],
                    [],
                    {"question_ids": [], "answers_per_question": [], "answers": []},
                )
                records[question.image_id] = record
            answers = list(question.answers or ())
            record.texts.append(question.question.strip())
            record.text_ids.append(str(question.question_id))
            record.extra["question_ids"].append(question.question_id)
            record.extra["answers_per_question"].append(len(answers))
            record.extra["answers"] += answers
        # The builder stores the test-dev questions as split "test_dev".
        expected[split.replace("-", "_")] = list(records.values())
    return expected


# ---------------------------------------------------------------------------
# Labelled tasks: NLVR2 and SNLI-VE in their official layouts, with small
# images drawn here instead of the sample photos.


@dataclasses.dataclass
class TaskSource:
    """A labelled-task source folder and what a correct build must store.

    `expected` lists the records per split in source order. Each record's
    `extra` has `labels`, one hand-written class per text, and for NLVR2
    `image_2`, the bytes of the pair's second image file. `skips` lists per
    split the `(id, word)` of each skip a build must report, where `word`
    appears in the skip's reason ("missing", "corrupt", "label", ...).
    """

    root: Path
    expected: Expected
    skips: dict[str, list[tuple[str, str]]]


def write_noise_image(
    path: Path, seed: int, size: tuple[int, int] = (40, 28), format: str = "PNG"
) -> bytes:
    """Write a random RGB image of `size` (width, height) and return its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(path, format=format)
    return path.read_bytes()


def write_garbage_image(path: Path) -> None:
    """Write bytes that no image decoder accepts under an image file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 20)


def _write_json_lines(path: Path, lines: list[dict | str]) -> None:
    """Write objects as JSON Lines; a str is written as it is (a broken line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    )
    path.write_text(text, encoding="utf-8")


# (identifier, sentence, label as in the file, class a build must store). NLVR2
# "True" is class 1 and "False" class 0. Sentence lines of different pairs are
# interleaved, and one sentence has surrounding whitespace.
NLVR2_SENTENCES = {
    "train": [
        ("train-10171-0-0", "The left image shows two dogs.", "True", 1),
        ("train-52-1-0", "Both images contain a red car.", "False", 0),
        ("train-10171-0-1", "  There are exactly three birds.\n", "False", 0),
        ("train-52-1-1", "One image has a person in it.", "True", 1),
        ("train-52-1-2", "The right image is at night.", "True", 1),
    ],
    "dev": [
        ("dev-850-0-0", "A bottle stands on a table.", "True", 1),
        ("dev-850-0-1", "The left image shows a beach.", "False", 0),
    ],
    "test1": [("test1-12-3-0", "Each image shows a single cat.", "True", 1)],
}
# The numbered train image sub-folder of each train pair.
NLVR2_DIRECTORIES = {"train-10171-0": 3, "train-52-1": 7}
# Where each split's images go: train in images/train/{directory}/ and dev in
# dev/ as the NLVR2 download unpacks them, test1 in the accepted images/test1/.
NLVR2_IMAGE_FOLDERS = {"train": "images/train", "dev": "dev", "test1": "images/test1"}


def write_nlvr2_fixture(
    root: Path, *, faults: bool = True, extra_pairs: int = 0
) -> TaskSource:
    """Write NLVR2 annotations and image pairs under root in the official layout.

    The annotation files go to `root/nlvr2/data/{train,dev,test1}.json`, and
    each pair's `-img0.png` and `-img1.png` (random images of different sizes)
    to the folders of `NLVR2_IMAGE_FOLDERS`.

    Args:
      root: the source folder to create.
      faults: also write train lines and files a build must skip. These are
        a pair whose second image is missing, a pair whose first image does not
        decode and one whose second image does not decode, a sentence labelled
        "Maybe", a repeated identifier and a line that is not JSON.
      extra_pairs: clean train pairs to add after the listed ones, each with
        two sentences labelled "True" then "False" (directory 0).
    """
    expected: Expected = {}
    skips: dict[str, list[tuple[str, str]]] = {}
    directories = dict(NLVR2_DIRECTORIES)
    seed = 0
    for split, sentences in NLVR2_SENTENCES.items():
        lines: list[dict | str] = []
        records: dict[str, ExpectedRecord] = {}
        rows = list(sentences)
        if split == "train":
            for number in range(extra_pairs):
                pair = f"train-9{number:03d}-0"
                directories[pair] = 0
                rows.append((f"{pair}-0", f"Extra pair {number} is true.", "True", 1))
                rows.append((f"{pair}-1", f"Extra pair {number} is false.", "False", 0))
        for identifier, sentence, label, label_class in rows:
            pair = identifier.rsplit("-", 1)[0]
            entry: dict[str, Any] = {
                "identifier": identifier,
                "sentence": sentence,
                "label": label,
                "validation": {},
                "writer": "fixture",
            }
            if split == "train":
                entry["directory"] = directories[pair]
            lines.append(entry)
            if pair not in records:
                folder = root / NLVR2_IMAGE_FOLDERS[split]
                if split == "train":
                    folder = folder / str(directories[pair])
                image = write_noise_image(folder / f"{pair}-img0.png", seed)
                image_2 = write_noise_image(
                    folder / f"{pair}-img1.png", seed + 1, size=(24, 36)
                )
                seed += 2
                records[pair] = ExpectedRecord(
                    pair, image, [], [], {"labels": [], "image_2": image_2}
                )
            records[pair].texts.append(sentence.strip())
            records[pair].text_ids.append(identifier)
            records[pair].extra["labels"].append(label_class)
        if faults and split == "train":
            lines += _write_nlvr2_faults(root)
            skips["train"] = [
                ("train-600-0", "missing"),
                ("train-601-2", "corrupt"),
                ("train-602-0", "corrupt"),
                ("train-10171-0-2", "label"),
                ("train-52-1-0", "duplicate"),
                ("train.json:", "invalid"),
            ]
        _write_json_lines(root / "nlvr2" / "data" / f"{split}.json", lines)
        expected[split] = list(records.values())
    return TaskSource(root, expected, skips)


def _write_nlvr2_faults(root: Path) -> list[dict | str]:
    """Write the faulty train pairs' images and return their annotation lines."""
    folder = root / "images" / "train" / "5"
    # A pair with its first image only.
    write_noise_image(folder / "train-600-0-img0.png", 100)
    # A pair whose first image does not decode.
    write_garbage_image(folder / "train-601-2-img0.png")
    write_noise_image(folder / "train-601-2-img1.png", 101)
    # A pair whose second image does not decode.
    write_noise_image(folder / "train-602-0-img0.png", 102)
    write_garbage_image(folder / "train-602-0-img1.png")

    lines: list[dict | str] = [
        {"identifier": f"{pair}-0", "sentence": text, "label": "True", "directory": 5}
        for pair, text in (
            ("train-600-0", "Only one image exists."),
            ("train-601-2", "The first image is broken."),
            ("train-602-0", "The second image is broken."),
        )
    ]
    lines += [
        {
            "identifier": "train-10171-0-2",
            "sentence": "This label is neither true nor false.",
            "label": "Maybe",
            "directory": 3,
        },
        {
            "identifier": "train-52-1-0",
            "sentence": "A second line with a used identifier.",
            "label": "True",
            "directory": 7,
        },
        '{"identifier": "train-603-0-0", "sentence": ',
    ]
    return lines


# (Flickr30K id, pairID, hypothesis, gold label, class a build must store).
# SNLI-VE classes follow the original BridgeTower: contradiction 0, neutral 1,
# entailment 2.
SNLI_VE_HYPOTHESES = {
    "train": [
        ("1000092795", "1000092795.jpg#0r1e", "Two men are outside.", "entailment", 2),
        (
            "10002456",
            "10002456.jpg#2r1c",
            "Nobody is at the market.",
            "contradiction",
            0,
        ),
        (
            "1000092795",
            "1000092795.jpg#0r1n",
            "  The men are brothers.\n",
            "neutral",
            1,
        ),
        ("10002456", "10002456.jpg#2r1e", "People are at a market.", "entailment", 2),
        (
            "1000092795",
            "1000092795.jpg#0r1c",
            "The men are asleep.",
            "contradiction",
            0,
        ),
    ],
    "dev": [
        (
            "1000344755",
            "1000344755.jpg#1r1n",
            "A man is fixing a window.",
            "neutral",
            1,
        ),
        (
            "1000344755",
            "1000344755.jpg#1r1c",
            "A woman is swimming.",
            "contradiction",
            0,
        ),
    ],
    "test": [
        ("1001545525", "1001545525.jpg#0r1e", "A dog is running.", "entailment", 2),
    ],
}


def write_snli_ve_fixture(
    root: Path,
    *,
    faults: bool = True,
    extra_images: int = 0,
    image_folder: str = "flickr30k_images",
) -> TaskSource:
    """Write SNLI-VE annotations and Flickr30K images under root.

    The annotations go to `root/snli_ve_{train,dev,test}.jsonl`, and each
    image, a random JPEG, to `root/{image_folder}/{Flickr30K_ID}.jpg`.

    Args:
      root: the source folder to create.
      faults: also write train lines and files a build must skip: a
        hypothesis with gold label "-", one with the unknown label "maybe", one
        whose image is missing and one whose image does not decode.
      extra_images: clean train images to add after the listed ones, each
        with three hypotheses labelled contradiction, neutral and entailment.
      image_folder: the image folder, relative to root.
    """
    images = root / image_folder
    expected: Expected = {}
    skips: dict[str, list[tuple[str, str]]] = {}
    seed = 500
    for split, hypotheses in SNLI_VE_HYPOTHESES.items():
        rows = list(hypotheses)
        if split == "train":
            for number in range(extra_images):
                image_id = f"2000{number:04d}"
                for letter, gold, label_class in (
                    ("c", "contradiction", 0),
                    ("n", "neutral", 1),
                    ("e", "entailment", 2),
                ):
                    rows.append(
                        (
                            image_id,
                            f"{image_id}.jpg#0r1{letter}",
                            f"Extra image {number} hypothesis {letter}.",
                            gold,
                            label_class,
                        )
                    )
        lines: list[dict | str] = []
        records: dict[str, ExpectedRecord] = {}
        for image_id, pair_id, hypothesis, gold, label_class in rows:
            lines.append(_snli_ve_line(image_id, pair_id, hypothesis, gold))
            if image_id not in records:
                data = write_noise_image(
                    images / f"{image_id}.jpg", seed, size=(36, 30), format="JPEG"
                )
                seed += 1
                records[image_id] = ExpectedRecord(
                    image_id, data, [], [], {"labels": []}
                )
            records[image_id].texts.append(hypothesis.strip())
            records[image_id].text_ids.append(pair_id)
            records[image_id].extra["labels"].append(label_class)
        if faults and split == "train":
            write_garbage_image(images / "1000268201.jpg")
            lines += [
                _snli_ve_line(
                    "1000092795", "1000092795.jpg#1r1n", "Two men talk.", "-"
                ),
                _snli_ve_line("10002456", "10002456.jpg#3r1m", "People shop.", "maybe"),
                _snli_ve_line("99999", "99999.jpg#0r1e", "A missing photo.", "neutral"),
                _snli_ve_line(
                    "1000268201", "1000268201.jpg#0r1e", "A broken photo.", "neutral"
                ),
            ]
            skips["train"] = [
                ("1000092795.jpg#1r1n", "gold label"),
                ("10002456.jpg#3r1m", "label"),
                ("99999", "missing"),
                ("1000268201", "corrupt"),
            ]
        _write_json_lines(root / f"snli_ve_{split}.jsonl", lines)
        expected[split] = list(records.values())
    return TaskSource(root, expected, skips)


def _snli_ve_line(image_id: str, pair_id: str, hypothesis: str, gold: str) -> dict:
    return {
        "Flickr30K_ID": image_id,
        "annotator_labels": [gold],
        "captionID": pair_id.split("r")[0],
        "gold_label": gold,
        "pairID": pair_id,
        "sentence1": "A premise caption of the image.",
        "sentence2": hypothesis,
    }
