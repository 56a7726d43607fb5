"""Dataset builders: official source layouts in, exact records out.

Every source is written by `tests/data_fixtures.py` from the real sample photos.
Every expected value is computed in this file or in data_fixtures.py from the
data written, never taken from `bt_jax.data`. Builds are shared per module to keep the file
fast; tests that need their own build use small sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from data_fixtures import (
    Expected,
    ExpectedRecord,
    Photo,
    Question,
    copy_photo,
    materialize_photos,
    vqa_annotation_entry,
    vqa_file_names,
    vqa_question_entry,
    write_coco_source,
    write_empty_file,
    write_json,
    write_jsonl_source,
    write_karpathy_coco_source,
    write_karpathy_flickr_source,
    write_text_file,
    write_truncated_jpeg,
    write_vqa_source,
)

from bt_jax import samples
from bt_jax.data import build_dataset, open_records
from bt_jax.data.reading import load_metadata
from bt_jax.data.vqa import answer_score, build_answer_vocab, normalize_answer
from bt_jax.processing import train_tokenizer

REGISTERED_NAMES = {
    "coco": "bt_coco_captions",
    "karpathy": "bt_karpathy_captions",
    "jsonl": "bt_image_text",
    "vqa": "bt_vqa_v2",
}


@dataclasses.dataclass
class Built:
    """A source folder, the dataset built from it and what it must contain."""

    source: Path
    out: Path
    dataset: Path
    expected: Expected
    format: str


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Photo]:
    return materialize_photos(tmp_path_factory.mktemp("samples") / "photos")


def _build(tmp_path_factory, photos, writer, format: str, **options) -> Built:
    base = tmp_path_factory.mktemp(f"{format}_build")
    source = base / "source"
    expected = writer(source, photos)
    dataset = build_dataset(format, source, base / "out", num_threads=2, **options)
    return Built(source, base / "out", Path(dataset), expected, format)


@pytest.fixture(scope="module")
def coco(tmp_path_factory, photos) -> Built:
    return _build(tmp_path_factory, photos, write_coco_source, "coco")


@pytest.fixture(scope="module")
def karpathy_coco(tmp_path_factory, photos) -> Built:
    return _build(tmp_path_factory, photos, write_karpathy_coco_source, "karpathy")


@pytest.fixture(scope="module")
def karpathy_flickr(tmp_path_factory, photos) -> Built:
    return _build(tmp_path_factory, photos, write_karpathy_flickr_source, "karpathy")


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, photos) -> Built:
    return _build(tmp_path_factory, photos, write_jsonl_source, "jsonl")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory, photos) -> Built:
    return _build(tmp_path_factory, photos, write_vqa_source, "vqa", min_answer_count=2)


def assert_reads_back(records, expected: list[ExpectedRecord], split: str) -> None:
    """Check that `records` contains exactly the expected records, in order."""
    assert len(records) == len(expected), f"{split}: number of records"
    for index, want in enumerate(expected):
        record = records[index]
        where = f"{split}[{index}] (image {want.id})"
        assert record["id"] == want.id, f"{where}: id"
        assert isinstance(record["image"], bytes), f"{where}: image type"
        same_image = record["image"] == want.image
        assert same_image, f"{where}: image bytes differ from the source file"
        assert record["texts"] == want.texts, f"{where}: texts"
        assert record["text_ids"] == want.text_ids, f"{where}: text ids"
        for name, value in want.extra.items():
            assert record[name] == value, f"{where}: {name}"


def assert_dataset_matches(dataset: Path | str, expected: Expected, **kwargs) -> None:
    for split, records_expected in expected.items():
        records = open_records(dataset, split, **kwargs)
        assert_reads_back(records, records_expected, split)
        counts = [len(record.texts) for record in records_expected]
        assert records.texts_per_record() == counts, f"{split}: texts per record"


def assert_splits(built: Built) -> None:
    records = open_records(built.dataset, next(iter(built.expected)))
    assert sorted(records.info.splits) == sorted(built.expected)


def assert_no_duplicates(built: Built) -> None:
    """Check that no split stores an image twice and no text is stored twice.

    Different splits may share an image (VQA test-dev is part of test2015).
    """
    text_ids = []
    for split in built.expected:
        image_ids = [record["id"] for record in open_records(built.dataset, split)]
        assert len(image_ids) == len(set(image_ids)), f"{split}: an image twice"
        for record in open_records(built.dataset, split):
            text_ids += record["text_ids"]
    assert len(text_ids) == len(set(text_ids)), "a text is stored twice"


# ---------------------------------------------------------------------------
# Clean sources read back exactly.


def test_coco_build_reads_back_exactly(coco):
    assert_splits(coco)
    assert_dataset_matches(coco.dataset, coco.expected)
    assert_no_duplicates(coco)


def test_karpathy_coco_build_reads_back_exactly(karpathy_coco):
    assert sorted(karpathy_coco.expected) == ["restval", "test", "train", "val"]
    assert_splits(karpathy_coco)
    assert_dataset_matches(karpathy_coco.dataset, karpathy_coco.expected)
    assert_no_duplicates(karpathy_coco)


def test_karpathy_flickr30k_build_reads_back_exactly(karpathy_flickr):
    assert_splits(karpathy_flickr)
    assert_dataset_matches(karpathy_flickr.dataset, karpathy_flickr.expected)
    assert_no_duplicates(karpathy_flickr)


def test_jsonl_build_reads_back_exactly(jsonl):
    assert_splits(jsonl)
    assert_dataset_matches(jsonl.dataset, jsonl.expected)
    assert_no_duplicates(jsonl)


def test_vqa_build_reads_back_exactly(vqa):
    assert sorted(vqa.expected) == ["test", "test_dev", "train", "val"]
    assert_splits(vqa)
    assert_dataset_matches(vqa.dataset, vqa.expected)
    assert_no_duplicates(vqa)


def test_jsonl_build_from_materialized_samples(tmp_path):
    """The folder `bt_jax.samples.materialize` writes is a JSON Lines source."""
    source = tmp_path / "samples"
    captions_file = samples.materialize(source)
    expected: dict[str, ExpectedRecord] = {}
    for line in captions_file.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        record = expected.get(entry["image"])
        if record is None:
            data = (source / entry["image"]).read_bytes()
            record = ExpectedRecord(entry["image"], data, [], [])
            expected[entry["image"]] = record
        record.texts.append(entry["caption"].strip())
        record.text_ids.append(entry["id"])
    assert len(expected) == 15, "the sample set has 15 photos"

    dataset = build_dataset("jsonl", source, tmp_path / "out", num_threads=2)

    records = open_records(dataset, "captions")
    assert_reads_back(records, list(expected.values()), "captions")
    total_texts = sum(len(record.texts) for record in expected.values())
    assert sum(records.texts_per_record()) == total_texts


def test_build_prints_no_download_lines(tmp_path, capsys, caplog):
    source = tmp_path / "samples"
    samples.materialize(source)
    with caplog.at_level(logging.INFO, logger="bt_jax.data"):
        build_dataset("jsonl", source, tmp_path / "out", num_threads=2)
    printed = capsys.readouterr().out
    assert "Downloading and preparing" not in printed
    assert "downloaded and prepared" not in printed
    assert f"building bt_image_text 1.0.0 in {tmp_path / 'out'}" in caplog.text


def test_coco_build_metadata_counts_texts(coco):
    metadata = load_metadata(coco.dataset)
    assert metadata["format"] == "coco"
    assert metadata["skipped"] == {}
    assert metadata["skipped_ids"] == {}
    expected_counts = {
        split: [len(record.texts) for record in records]
        for split, records in coco.expected.items()
    }
    assert metadata["texts_per_record"] == expected_counts


# ---------------------------------------------------------------------------
# VQA answers: normalisation, scores, vocabulary and soft targets.


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("isnt", "isn't"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("None", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("an apple", "apple"),
        ("A Dog", "dog"),
        ("\ttwo\n", "2"),
        ("3.", "3"),
        ("mr. smith", "mr smith"),
        # A mark touching a space is removed, otherwise it becomes a space.
        ("red; blue", "red blue"),
        ("red;blue", "red blue"),
        ("black-and-white", "black and white"),
        ("left - right", "left right"),
        ("cat/dog", "cat dog"),
        ("hot dog?", "hot dog"),
        ("no, thanks", "no thanks"),
        # A comma between digits makes every mark vanish.
        ("1,000 (approx)", "1000 approx"),
        # The spacing test looks at the answer as given, before any mark of
        # it has been replaced: ")" touches a space, "(" and "-" do not.
        ("(-1) t-shirt", "1 t shirt"),
        # Words the official contraction table does not list stay as they are.
        ("shell", "shell"),
        ("its", "its"),
        ("were", "were"),
        ("ill", "ill"),
    ],
)
def test_normalize_answer_follows_official_rules(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.parametrize(
    ("count", "score"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_answer_score_is_capped_linear(count, score):
    assert answer_score(count) == pytest.approx(score)


def test_answer_vocab_threshold_and_order():
    answers = ["Two", "yes", "2", "no", "yes!", "two", "no", "the dog."]
    assert build_answer_vocab(answers, min_count=2) == ["2", "yes", "no"]
    assert build_answer_vocab(answers, min_count=1) == ["2", "yes", "no", "dog"]
    assert build_answer_vocab(answers, min_count=3) == ["2"]


def test_vqa_build_vocabulary_from_train_then_val(vqa):
    # multiple_choice_answer, normalised: train 2, yes, 2, no; val yes, 2, no,
    # dog. With min_answer_count=2 "dog" (seen once) is left out.
    records = open_records(vqa.dataset, "train")
    assert records.answer_vocab == ["2", "yes", "no"]
    assert load_metadata(vqa.dataset)["answer_vocab"] == ["2", "yes", "no"]


# Soft targets by hand, vocabulary ["2", "yes", "no"]: per image, the number of
# in-vocabulary answers of each question, then their labels and scores in order
# of first appearance among the 10 human answers.
VQA_SOFT_TARGETS = {
    "train": [
        # Image 9. Question 90: "2" x6 -> 1.0. Question 91: "2" x3 -> 0.9.
        {"answer_counts": [1, 1], "answer_labels": [0, 0], "scores": [1.0, 0.9]},
        # Image 25. Question 250: yes x7, no x2. Question 251: "no", "No",
        # "no.", "No!" are all "no" (x7), then yes x2.
        {
            "answer_counts": [2, 2],
            "answer_labels": [1, 2, 2, 1],
            "scores": [1.0, 0.6, 1.0, 0.6],
        },
    ],
    "val": [
        # Image 42. Question 420: yes x9, no x1. Question 421: "two", "2", "2"
        # -> "2" x3. Question 422: no x10. Question 423: only dogs, a cat and
        # "none" (-> "0"), none of them in the vocabulary.
        {
            "answer_counts": [2, 1, 1, 0],
            "answer_labels": [1, 2, 0, 2],
            "scores": [1.0, 0.3, 0.9, 1.0],
        },
    ],
    "test": [{"answer_counts": [0], "answer_labels": [], "scores": []}],
    "test_dev": [{"answer_counts": [0], "answer_labels": [], "scores": []}],
}


@pytest.mark.parametrize("split", sorted(VQA_SOFT_TARGETS))
def test_vqa_build_stores_soft_scores(vqa, split):
    records = open_records(vqa.dataset, split)
    assert len(records) == len(VQA_SOFT_TARGETS[split])
    for index, want in enumerate(VQA_SOFT_TARGETS[split]):
        record = records[index]
        assert record["answer_counts"] == want["answer_counts"], f"{split}[{index}]"
        assert record["answer_labels"] == want["answer_labels"], f"{split}[{index}]"
        assert record["answer_scores"] == pytest.approx(want["scores"], abs=1e-6)


def test_vqa_build_uses_given_answer_vocab(tmp_path, photos):
    source = tmp_path / "source"
    write_vqa_source(source, photos)
    vocab = ["dog", "no", "yes", "Two"]

    dataset = build_dataset(
        "vqa", source, tmp_path / "out", answer_vocab=vocab, num_threads=2
    )

    train = open_records(dataset, "train")
    val = open_records(dataset, "val")
    assert train.answer_vocab == vocab
    assert load_metadata(dataset)["answer_vocab"] == vocab
    # Image 25, question 250: yes x7 (label 2), no x2 (label 1); question 251:
    # no x7, yes x2.
    assert train[1]["answer_labels"] == [2, 1, 1, 2]
    assert train[1]["answer_scores"] == pytest.approx([1.0, 0.6, 1.0, 0.6])
    # Image 42. Question 420: yes x9, no x1. Question 421: its answers
    # normalise to "2", which "Two" as given does not match. Question 422: no
    # x10. Question 423: "the dog.", "dog", "a dog", "Dog", "dog", "dog!" are
    # all "dog" (x6, label 0).
    assert val[0]["answer_counts"] == [2, 0, 1, 1]
    assert val[0]["answer_labels"] == [2, 1, 1, 0]
    assert val[0]["answer_scores"] == pytest.approx([1.0, 0.3, 1.0, 1.0])


def test_vqa_build_without_frequent_answers_raises(tmp_path, photos):
    source = tmp_path / "source"
    write_vqa_source(source, photos)
    # No normalised multiple_choice_answer of the fixture occurs 9 times.
    with pytest.raises(ValueError, match="min_answer_count"):
        build_dataset("vqa", source, tmp_path / "out")


# ---------------------------------------------------------------------------
# Invalid records and unusable images are skipped, counted, logged and listed.


@dataclasses.dataclass
class FaultySource:
    """A source mixing good records with invalid ones.

    `skips` lists, per split, `(id, reason word)` for every expected skip. An
    invalid entry may be identified by its text, so a skipped id matches when
    it contains `id`.
    """

    source: Path
    expected: Expected
    skips: dict[str, list[tuple[str, str]]]


def write_faulty_coco(root: Path, photos: dict[str, Photo]) -> FaultySource:
    coins, micro, text = photos["coins"], photos["microaneurysms"], photos["text"]
    train = root / "train2017"
    coins_bytes = copy_photo(coins, train / "000008100001.png")
    write_truncated_jpeg(photos["rocket"], train / "000008100003.jpg")
    write_empty_file(train / "000008100004.jpg")
    write_text_file(train / "000008100005.jpg")
    micro_bytes = copy_photo(micro, train / "000008100006.png")
    copy_photo(text, train / "000008100008.png")
    brick_bytes = copy_photo(photos["brick"], root / "val2017" / "000008200001.png")

    images = [
        {"id": 8100001, "file_name": "000008100001.png"},
        {"id": 8100002, "file_name": "000008100002.jpg"},  # no such file
        {"id": 8100003, "file_name": "000008100003.jpg"},
        {"id": 8100004, "file_name": "000008100004.jpg"},
        {"id": 8100005, "file_name": "000008100005.jpg"},
        {"id": 8100006, "file_name": "000008100006.png"},
        {"id": 8100006, "file_name": "000008100001.png"},  # duplicate id
        {"id": 8100007},  # no file_name
        {"id": 8100008, "file_name": "000008100008.png"},
        {"id": 8100009, "file_name": 5},  # file_name of the wrong type
    ]

    annotations = [
        {"image_id": 8100001, "id": 9100001, "caption": coins.captions[0]},
        {"image_id": 8100001, "id": 9100002, "caption": "   "},
        {"image_id": 8100001, "id": 9100003, "caption": 17},
        {"image_id": 8100006, "id": 9100010, "caption": micro.captions[0]},
        {"image_id": 8100008, "id": 9100020, "caption": ""},
        {"image_id": 8199999, "id": 9100030, "caption": "an unknown image"},
        {"image_id": 8100006, "id": 9100010, "caption": "listed twice"},
        {"id": 9100040, "caption": "no image_id"},
        {"image_id": 8100006, "id": 9100050},  # no caption
        {"image_id": 8100002, "id": 9100060, "caption": "missing file"},
        {"image_id": 8100003, "id": 9100061, "caption": "truncated file"},
        {"image_id": 8100004, "id": 9100062, "caption": "empty file"},
        {"image_id": 8100005, "id": 9100063, "caption": "a text file"},
        {"image_id": 8100006, "id": 9100011, "caption": micro.captions[1]},
        {"image_id": 8100001, "id": 9100004, "caption": f" {coins.captions[1]} "},
    ]

    write_json(
        root / "annotations" / "captions_train2017.json",
        {"images": images, "annotations": annotations},
    )

    write_json(
        root / "annotations" / "captions_val2017.json",
        {
            "images": [{"id": 8200001, "file_name": "000008200001.png"}],
            "annotations": [
                {"image_id": 8200001, "id": 9200001, "caption": "a brick wall"}
            ],
        },
    )

    expected = {
        "train": [
            ExpectedRecord(
                "8100001",
                coins_bytes,
                [coins.captions[0], coins.captions[1]],
                ["9100001", "9100004"],
            ),
            ExpectedRecord(
                "8100006",
                micro_bytes,
                [micro.captions[0], micro.captions[1]],
                ["9100010", "9100011"],
            ),
        ],
        "val": [ExpectedRecord("8200001", brick_bytes, ["a brick wall"], ["9200001"])],
    }

    skips = {
        "train": [
            ("8100002", "missing"),
            ("8100003", "corrupt"),
            ("8100004", "corrupt"),
            ("8100005", "corrupt"),
            ("8100006", "duplicate"),
            ("8100007", "invalid"),
            ("8100008", "text"),
            ("8100009", "invalid"),
            ("9100002", "empty"),
            ("9100003", "invalid"),
            ("9100020", "empty"),
            ("9100030", "unknown"),
            ("9100010", "duplicate"),
            ("9100040", "invalid"),
            ("9100050", "invalid"),
        ]
    }
    return FaultySource(root, expected, skips)


def write_faulty_karpathy(root: Path, photos: dict[str, Photo]) -> FaultySource:
    coins, brick = photos["coins"], photos["brick"]
    coins_bytes = copy_photo(coins, root / "train2014" / "COCO_train2014_coins.png")
    brick_bytes = copy_photo(brick, root / "val2014" / "COCO_val2014_brick.png")
    write_truncated_jpeg(photos["rocket"], root / "train2014" / "truncated.jpg")
    copy_photo(photos["text"], root / "val2014" / "COCO_val2014_text.png")

    def entry(cocoid, split, filename, folder, sentences):
        return {
            "filepath": folder,
            "filename": filename,
            "cocoid": cocoid,
            "split": split,
            "sentences": sentences,
        }

    images = [
        entry(
            8300001,
            "train",
            "COCO_train2014_coins.png",
            "train2014",
            [
                {"raw": coins.captions[0], "sentid": 9300001},
                {"raw": "  ", "sentid": 9300002},
                {"raw": 42, "sentid": 9300003},
                {"raw": coins.captions[1], "sentid": 9300004},
            ],
        ),
        entry(8300002, "val", "missing.png", "val2014", [{"raw": "x", "sentid": 1}]),
        entry(8300003, "train", "truncated.jpg", "train2014", [{"raw": "y"}]),
        entry(8300004, "bogus", "COCO_val2014_text.png", "val2014", [{"raw": "z"}]),
        entry(
            8300001,
            "val",
            "COCO_val2014_text.png",
            "val2014",
            [{"raw": "listed twice", "sentid": 9300005}],
        ),
        entry(
            8300006,
            "val",
            "COCO_val2014_text.png",
            "val2014",
            [{"raw": "", "sentid": 9300006}],
        ),
        entry(
            8300007,
            "val",
            "COCO_val2014_brick.png",
            "val2014",
            [{"raw": brick.captions[0], "sentid": 9300007}, "not a sentence"],
        ),
    ]

    write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})

    expected = {
        "train": [
            ExpectedRecord(
                "8300001",
                coins_bytes,
                [coins.captions[0], coins.captions[1]],
                ["9300001", "9300004"],
            )
        ],
        "val": [
            ExpectedRecord("8300007", brick_bytes, [brick.captions[0]], ["9300007"])
        ],
    }

    skips = {
        "all": [("8300004", "split")],
        "train": [
            ("9300002", "empty"),
            ("9300003", "invalid"),
            ("8300003", "corrupt"),
        ],
        "val": [
            ("8300002", "missing"),
            ("9300006", "empty"),
            ("8300006", "text"),
            ("8300007/1", "invalid"),
            ("8300001", "duplicate"),
        ],
    }
    return FaultySource(root, expected, skips)


def write_faulty_jsonl(root: Path, photos: dict[str, Photo]) -> FaultySource:
    coins, micro, brick = photos["coins"], photos["microaneurysms"], photos["brick"]
    coins_bytes = copy_photo(coins, root / "images" / "coins.png")
    micro_bytes = copy_photo(micro, root / "images" / "microaneurysms.png")
    brick_bytes = copy_photo(brick, root / "images" / "brick.png")
    write_truncated_jpeg(photos["rocket"], root / "images" / "truncated.jpg")
    write_empty_file(root / "images" / "empty.jpg")
    write_text_file(root / "images" / "text.jpg")

    lines = [
        {"image": "images/coins.png", "caption": coins.captions[0], "id": "j-c0"},
        "{not json",
        {"caption": "no image"},
        {"image": "images/coins.png"},
        {"image": 7, "caption": "image of the wrong type"},
        {"image": "images/coins.png", "caption": "   ", "id": "j-empty"},
        {"image": "images/coins.png", "caption": 3.5, "id": "j-number"},
        {"image": "images/missing.png", "caption": "missing", "id": "j-m"},
        {"image": "images/truncated.jpg", "caption": "truncated", "id": "j-t"},
        {"image": "images/empty.jpg", "caption": "empty file", "id": "j-e"},
        {"image": "images/text.jpg", "caption": "a text file", "id": "j-x"},
        {"image": "images/coins.png", "caption": coins.captions[1], "id": "j-c1"},
        {
            "image": "images/microaneurysms.png",
            "caption": micro.captions[0],
            "id": "j-m0",
        },
        [1, 2],
        "",
    ]

    text = "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    )

    (root / "train.jsonl").write_text(text, encoding="utf-8")
    (root / "val.jsonl").write_text(
        json.dumps({"image": "images/brick.png", "caption": "bricks", "id": "v0"})
        + "\n",
        encoding="utf-8",
    )

    expected = {
        "train": [
            ExpectedRecord(
                "images/coins.png",
                coins_bytes,
                [coins.captions[0], coins.captions[1]],
                ["j-c0", "j-c1"],
            ),
            ExpectedRecord(
                "images/microaneurysms.png", micro_bytes, [micro.captions[0]], ["j-m0"]
            ),
        ],
        "val": [ExpectedRecord("images/brick.png", brick_bytes, ["bricks"], ["v0"])],
    }

    skips = {
        "train": [
            ("train.jsonl:2", "invalid"),
            ("train.jsonl:3", "invalid"),
            ("train.jsonl:4", "invalid"),
            ("train.jsonl:5", "invalid"),
            ("j-empty", "empty"),
            ("j-number", "invalid"),
            ("images/missing.png", "missing"),
            ("images/truncated.jpg", "corrupt"),
            ("images/empty.jpg", "corrupt"),
            ("images/text.jpg", "corrupt"),
            ("train.jsonl:14", "invalid"),
        ]
    }
    return FaultySource(root, expected, skips)


def write_faulty_vqa(root: Path, photos: dict[str, Photo]) -> FaultySource:
    rocket_bytes = copy_photo(photos["rocket"], root / "train2014" / _vqa_image(9))
    write_truncated_jpeg(photos["retina"], root / "train2014" / _vqa_image(32))
    good = Question(95001, 9, "Is it a rocket?", "yes", ("yes",) * 10)
    last = Question(95009, 9, "Is it night?", "yes", ("no",) * 2 + ("yes",) * 8)

    questions = [
        vqa_question_entry(good),
        {"question": "no ids"},
        {"question_id": "95002", "image_id": 9, "question": "string id?"},
        {"question_id": 95003, "image_id": "9", "question": "string image?"},
        vqa_question_entry(good),
        {"question_id": 95004, "image_id": 9, "question": "  "},
        {"question_id": 95005, "image_id": 9, "question": "No annotation?"},
        {"question_id": 95006, "image_id": 9, "question": "Broken answers?"},
        vqa_question_entry(Question(95007, 31, "Missing image?")),
        vqa_question_entry(Question(95008, 32, "Truncated image?")),
        vqa_question_entry(last),
    ]

    broken = {**vqa_annotation_entry(good), "question_id": 95006, "answers": "yes"}

    annotations = [
        vqa_annotation_entry(good),
        broken,
        vqa_annotation_entry(Question(95007, 31, "", "yes", ("yes",) * 10)),
        vqa_annotation_entry(Question(95008, 32, "", "yes", ("yes",) * 10)),
        vqa_annotation_entry(last),
    ]

    questions_file, annotations_file = vqa_file_names("train")

    write_json(root / questions_file, {"questions": questions})

    write_json(root / annotations_file, {"annotations": annotations})

    expected = {
        "train": [
            ExpectedRecord(
                "9",
                rocket_bytes,
                [good.question, last.question],
                ["95001", "95009"],
                {
                    "question_ids": [95001, 95009],
                    "answers_per_question": [10, 10],
                    "answers": list(good.answers) + list(last.answers),
                    # Vocabulary ["yes", "no"]: yes x10; then no x2, yes x8.
                    "answer_counts": [1, 2],
                    "answer_labels": [0, 1, 0],
                },
            )
        ]
    }

    skips = {
        "train": [
            ("no ids", "invalid"),
            ("95002", "invalid"),
            ("95003", "invalid"),
            ("95001", "duplicate"),
            ("95004", "empty"),
            ("95005", "annotation"),
            ("95006", "annotation"),
            ("31", "missing"),
            ("32", "corrupt"),
        ]
    }
    return FaultySource(root, expected, skips)


def _vqa_image(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


FAULTY_WRITERS = {
    "coco": write_faulty_coco,
    "karpathy": write_faulty_karpathy,
    "jsonl": write_faulty_jsonl,
    "vqa": write_faulty_vqa,
}
FAULTY_OPTIONS = {"vqa": {"answer_vocab": ["yes", "no"]}}


@pytest.fixture(scope="module", params=sorted(FAULTY_WRITERS))
def faulty(request, tmp_path_factory, photos) -> tuple[FaultySource, Path]:
    """A faulty source of each format and the dataset built from it."""
    base = tmp_path_factory.mktemp(f"faulty_{request.param}")
    source = FAULTY_WRITERS[request.param](base / "source", photos)
    options = FAULTY_OPTIONS.get(request.param, {})
    dataset = build_dataset(
        request.param, source.source, base / "out", num_threads=2, **options
    )
    return source, Path(dataset)


def _matching_skips(entries: list, record_id: str, word: str) -> list:
    return [
        (skip_id, reason)
        for skip_id, reason in entries
        if (skip_id == record_id or record_id in skip_id) and word in reason.lower()
    ]


def test_faulty_build_keeps_good_records_intact(faulty):
    source, dataset = faulty
    assert_dataset_matches(dataset, source.expected)


def test_faulty_build_lists_skips_in_metadata(faulty):
    source, dataset = faulty
    metadata = load_metadata(dataset)
    for split, skips in source.skips.items():
        entries = metadata["skipped_ids"].get(split, [])
        for record_id, word in skips:
            found = _matching_skips(entries, record_id, word)
            assert len(found) == 1, f"{split}: skip of {record_id} ({word})"
        assert len(entries) == len(skips), f"{split}: number of skips"
        counted = sum(metadata["skipped"].get(split, {}).values())
        assert counted == len(skips), f"{split}: skip counts"
    assert sorted(metadata["skipped_ids"]) == sorted(source.skips)


@pytest.mark.parametrize("format", sorted(FAULTY_WRITERS))
def test_faulty_build_logs_each_skip(format, tmp_path, photos, caplog):
    source = FAULTY_WRITERS[format](tmp_path / "source", photos)
    caplog.set_level(logging.WARNING, logger="bt_jax.data")

    build_dataset(
        format,
        source.source,
        tmp_path / "out",
        num_threads=2,
        **FAULTY_OPTIONS.get(format, {}),
    )

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name.startswith("bt_jax.data")
    ]
    for split, skips in source.skips.items():
        for record_id, _ in skips:
            logged = [m for m in warnings if record_id in m and split in m]
            assert logged, f"no warning names {record_id} in split {split}"


def _write_small_karpathy(root: Path, photos: dict[str, Photo], extra: dict) -> None:
    """Write dataset_coco.json with one good train image and the `extra` entry."""
    copy_photo(photos["coins"], root / "train2014" / "coins.png")
    good = {
        "filepath": "train2014",
        "filename": "coins.png",
        "cocoid": 8400001,
        "split": "train",
        "sentences": [{"raw": "coins on a table", "sentid": 9400001}],
    }
    write_json(root / "dataset_coco.json", {"images": [good, extra]})


def test_karpathy_invalid_entry_logged_by_id(tmp_path, photos, caplog):
    entry = {"cocoid": 8400002, "split": "train", "sentences": [{"raw": "x"}]}
    _write_small_karpathy(tmp_path / "source", photos, entry)
    caplog.set_level(logging.WARNING, logger="bt_jax.data")

    dataset = build_dataset("karpathy", tmp_path / "source", tmp_path / "out")

    skipped = load_metadata(dataset)["skipped_ids"]["all"]
    assert len(skipped) == 1
    assert "8400002" in skipped[0][0], skipped
    assert any("8400002" in message for message in caplog.messages)


def test_karpathy_duplicate_in_empty_split_listed(tmp_path, photos):
    # The only "test" entry repeats the train image's cocoid.
    entry = {
        "filepath": "train2014",
        "filename": "coins.png",
        "cocoid": 8400001,
        "split": "test",
        "sentences": [{"raw": "listed twice", "sentid": 9400002}],
    }
    _write_small_karpathy(tmp_path / "source", photos, entry)

    dataset = build_dataset("karpathy", tmp_path / "source", tmp_path / "out")

    metadata = load_metadata(dataset)
    assert "test" in metadata["skipped_ids"], metadata["skipped_ids"]
    assert [skip_id for skip_id, _ in metadata["skipped_ids"]["test"]] == ["8400001"]
    assert sum(metadata["skipped"]["test"].values()) == 1


def _write_jsonl_lines(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


def test_build_without_usable_records_raises(tmp_path):
    source = tmp_path / "source"
    _write_jsonl_lines(
        source / "train.jsonl",
        [{"caption": "no image"}, {"image": "images/a.png", "caption": "  "}],
    )

    with pytest.raises(ValueError, match="no usable records") as raised:
        build_dataset("jsonl", source, tmp_path / "out")

    assert str(source) in str(raised.value)
    assert not (tmp_path / "out" / "bt_image_text" / "1.0.0").exists()


def test_build_without_usable_images_raises(tmp_path, photos):
    source = tmp_path / "source"
    write_truncated_jpeg(photos["rocket"], source / "images" / "truncated.jpg")
    _write_jsonl_lines(
        source / "train.jsonl",
        [
            {"image": "images/missing.png", "caption": "a missing photo"},
            {"image": "images/truncated.jpg", "caption": "a truncated photo"},
        ],
    )

    with pytest.raises(ValueError) as raised:
        build_dataset("jsonl", source, tmp_path / "out")

    assert str(source) in str(raised.value)


def test_build_omits_split_without_usable_images(tmp_path, photos):
    source = tmp_path / "source"
    coins_bytes = copy_photo(photos["coins"], source / "images" / "coins.png")
    _write_jsonl_lines(
        source / "train.jsonl",
        [{"image": "images/coins.png", "caption": "coins", "id": "t0"}],
    )
    _write_jsonl_lines(
        source / "val.jsonl",
        [{"image": "images/missing.png", "caption": "a missing photo", "id": "v0"}],
    )

    dataset = build_dataset("jsonl", source, tmp_path / "out")

    train = open_records(dataset, "train")
    assert_reads_back(
        train,
        [ExpectedRecord("images/coins.png", coins_bytes, ["coins"], ["t0"])],
        "train",
    )
    assert "val" not in train.info.splits
    skipped = load_metadata(dataset)["skipped_ids"]["val"]
    assert [skip_id for skip_id, _ in skipped] == ["images/missing.png"]


# ---------------------------------------------------------------------------
# Building into an existing dataset.


def test_build_into_existing_dataset_raises(tmp_path, photos):
    source = tmp_path / "source"
    expected = write_jsonl_source(source, photos)
    build_dataset("jsonl", source, tmp_path / "out", num_threads=2)

    with pytest.raises(FileExistsError, match="overwrite"):
        build_dataset("jsonl", source, tmp_path / "out", num_threads=2)

    dataset = tmp_path / "out" / "bt_image_text" / "1.0.0"
    assert_dataset_matches(dataset, expected)


def test_build_with_overwrite_rebuilds(tmp_path, photos):
    source = tmp_path / "source"
    write_jsonl_source(source, photos)
    build_dataset("jsonl", source, tmp_path / "out", num_threads=2)
    # The new source has one split, one image and one caption.
    (source / "val.jsonl").unlink()
    _write_jsonl_lines(
        source / "train.jsonl",
        [{"image": "images/coins.png", "caption": "  rebuilt  ", "id": "r0"}],
    )
    coins_bytes = photos["coins"].path.read_bytes()

    dataset = build_dataset(
        "jsonl", source, tmp_path / "out", overwrite=True, num_threads=2
    )

    train = open_records(dataset, "train")
    assert_reads_back(
        train,
        [ExpectedRecord("images/coins.png", coins_bytes, ["rebuilt"], ["r0"])],
        "train",
    )
    assert sorted(train.info.splits) == ["train"]
    assert train.texts_per_record() == [1]
    assert load_metadata(dataset)["texts_per_record"] == {"train": [1]}


# ---------------------------------------------------------------------------
# Opening by registered TFDS name, and joined splits.


@pytest.mark.parametrize(
    "built_name", ["coco", "karpathy_coco", "karpathy_flickr", "jsonl", "vqa"]
)
def test_open_records_by_registered_name(built_name, request):
    built = request.getfixturevalue(built_name)
    name = REGISTERED_NAMES[built.format]
    assert_dataset_matches(name, built.expected, data_dir=built.out)


def test_open_records_joined_splits_concatenate(jsonl):
    records = open_records("bt_image_text", "train+val", data_dir=jsonl.out)
    expected = jsonl.expected["train"] + jsonl.expected["val"]
    assert_reads_back(records, expected, "train+val")
    counts = [len(record.texts) for record in expected]
    assert records.texts_per_record() == counts


def test_open_records_joined_karpathy_train_restval(karpathy_coco):
    records = open_records(karpathy_coco.dataset, "train+restval")
    expected = karpathy_coco.expected["train"] + karpathy_coco.expected["restval"]
    assert_reads_back(records, expected, "train+restval")


def test_open_records_under_incomplete_named_folder(tmp_path, jsonl):
    """Only TFDS's own unfinished folders are ignored, whatever the parents are."""
    out = tmp_path / "incomplete_runs" / "out"
    shutil.copytree(jsonl.out, out)

    records = open_records(out, "train")

    assert_reads_back(records, jsonl.expected["train"], "train")


# ---------------------------------------------------------------------------
# Command line.


def _run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "bt_jax.data", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, photos) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [caption for photo in photos.values() for caption in photo.captions]
    train_tokenizer(texts, directory, vocab_size=1000)
    return directory


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory, photos, tokenizer_dir):
    """`build jsonl` with --tokenizer, on a fresh copy of the JSON Lines source."""
    base = tmp_path_factory.mktemp("cli")
    expected = write_jsonl_source(base / "source", photos)
    result = _run_cli(
        "build", "jsonl", base / "source", "--out", base / "out",
        "--tokenizer", tokenizer_dir,
    )  # fmt: skip
    return base, expected, result


def _split_row(stdout: str, split: str) -> list[str]:
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [split]]
    assert len(rows) == 1, f"one row for split {split} in:\n{stdout}"
    return rows[0]


def _percentiles(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths)
    return {
        **{f"p{p}": float(np.percentile(values, p)) for p in (50, 90, 95, 99)},
        "max": int(values.max()),
    }


def test_cli_build_prints_token_statistics(cli_build, tokenizer_dir):
    base, expected, result = cli_build
    assert result.returncode == 0, result.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stats = json.loads(
        (base / "out" / "bt_image_text" / "1.0.0" / "statistics.json").read_text()
    )
    assert stats["length_unit"] == "tokens"
    assert "tokens p50/p90/p99/max" in result.stdout
    for split, records in expected.items():
        texts = [text for record in records for text in record.texts]
        per_image = [len(record.texts) for record in records]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        want = _percentiles(lengths)
        row = _split_row(result.stdout, split)
        assert row[1:3] == [str(len(records)), str(len(texts))], row
        assert row[3] == f"{np.mean(per_image):.2f}", row
        assert row[4] == f"({min(per_image)}-{max(per_image)})", row
        printed = f"{want['p50']:.0f}/{want['p90']:.0f}/{want['p99']:.0f}/{want['max']}"
        assert row[5] == printed, row
        split_stats = stats["splits"][split]
        assert split_stats["images"] == len(records)
        assert split_stats["texts"] == len(texts)
        assert split_stats["texts_per_image"]["mean"] == pytest.approx(
            np.mean(per_image)
        )
        for key, value in want.items():
            assert split_stats["text_length"][key] == pytest.approx(value), key


def test_cli_stats_prints_word_statistics(cli_build):
    base, expected, _ = cli_build
    dataset = base / "out" / "bt_image_text" / "1.0.0"
    (dataset / "text_lengths.png").unlink()

    result = _run_cli("stats", base / "out")

    assert result.returncode == 0, result.stderr
    assert "words p50/p90/p99/max" in result.stdout
    stats = json.loads((dataset / "statistics.json").read_text())
    assert stats["length_unit"] == "words"
    for split, records in expected.items():
        texts = [text for record in records for text in record.texts]
        want = _percentiles([len(text.split()) for text in texts])
        row = _split_row(result.stdout, split)
        assert row[1:3] == [str(len(records)), str(len(texts))], row
        for key, value in want.items():
            assert stats["splits"][split]["text_length"][key] == pytest.approx(value)
    plot = (dataset / "text_lengths.png").read_bytes()
    assert plot.startswith(b"\x89PNG\r\n\x1a\n"), "text_lengths.png is not a PNG"


@pytest.mark.parametrize(
    ("args", "value"),
    [
        (("build", "jsonx", "{source}", "--out", "{out}"), "jsonx"),
        (("build", "jsonl", "{missing}", "--out", "{out}"), "{missing}"),
        (("stats", "{missing}"), "{missing}"),
    ],
    ids=["unknown_format", "missing_source", "missing_dataset"],
)
def test_cli_bad_input_exits_with_error(args, value, tmp_path, jsonl):
    paths = {
        "source": jsonl.source,
        "out": tmp_path / "out",
        "missing": tmp_path / "no_such_folder",
    }

    result = _run_cli(*(arg.format(**paths) for arg in args))

    assert result.returncode != 0
    assert value.format(**paths) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
