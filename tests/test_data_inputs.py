"""Unusual and broken source files: encodings, names, duplicates, interrupted
builds, answer vocabularies and tokenizers."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import copy_photo, materialize_photos
from helpers import REPO

from bt_jax.data import build_dataset, open_records
from bt_jax.data.__main__ import _load_answer_vocab
from bt_jax.data.reading import load_metadata
from bt_jax.data.vqa import check_answer_vocab
from bt_jax.processing import load_tokenizer

CLI_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return materialize_photos(tmp_path_factory.mktemp("samples"))


def _source(root: Path, photos, name: str, lines: list[bytes]) -> Path:
    copy_photo(photos["coins"], root / "images" / "coins.png")
    copy_photo(photos["camera"], root / "images" / "camera.png")
    (root / name).write_bytes(b"".join(lines))
    return root


def _line(image: str, caption: str, **extra) -> bytes:
    return (json.dumps({"image": image, "caption": caption, **extra}) + "\n").encode()


def test_jsonl_byte_order_mark_keeps_first_line(tmp_path, photos):
    lines = [
        b"\xef\xbb\xbf" + _line("images/coins.png", "Coins on a table."),
        _line("images/camera.png", "A man with a camera."),
    ]
    source = _source(tmp_path / "source", photos, "train.jsonl", lines)

    records = open_records(build_dataset("jsonl", source, tmp_path / "out"), "train")

    assert [records[i]["texts"] for i in range(len(records))] == [
        ["Coins on a table."],
        ["A man with a camera."],
    ]


def test_jsonl_invalid_utf8_line_skipped_by_id(tmp_path, photos, caplog):
    lines = [
        _line("images/coins.png", "Coins on a table."),
        b'{"image": "images/camera.png", "caption": "caf\xe9"}\n',
    ]
    source = _source(tmp_path / "source", photos, "train.jsonl", lines)

    with caplog.at_level(logging.WARNING):
        dataset = build_dataset("jsonl", source, tmp_path / "out")

    records = open_records(dataset, "train")
    assert len(records) == 1
    assert "train.jsonl:2" in caplog.text
    assert load_metadata(dataset)["skipped"]["train"] == {"invalid record": 1}


def test_jsonl_unusable_split_name_rejected(tmp_path, photos):
    source = _source(
        tmp_path / "source",
        photos,
        "train.v2.jsonl",
        [_line("images/coins.png", "Coins.")],
    )

    with pytest.raises(ValueError, match=r"train\.v2\.jsonl cannot name a split"):
        build_dataset("jsonl", source, tmp_path / "out")


def test_jsonl_duplicates_skipped(tmp_path, photos):
    lines = [
        _line("images/coins.png", "Coins on a table.", id="a"),
        _line("images/camera.png", "A man with a camera.", id="a"),
        _line("images/coins.png", "Coins on a table."),
        _line(str(tmp_path / "source" / "images" / "coins.png"), "Old coins."),
    ]
    source = _source(tmp_path / "source", photos, "train.jsonl", lines)

    dataset = build_dataset("jsonl", source, tmp_path / "out")

    records = open_records(dataset, "train")
    assert len(records) == 1, "the absolute path names the same image"
    assert records[0]["texts"] == ["Coins on a table.", "Old coins."]
    assert records[0]["text_ids"] == ["a", "train.jsonl:4"]
    skipped = load_metadata(dataset)["skipped"]["train"]
    assert skipped == {"duplicate id": 1, "duplicate record": 1}


def test_coco_annotations_not_a_list_rejected(tmp_path, photos):
    source = tmp_path / "source"
    copy_photo(photos["coins"], source / "train2017" / "coins.png")
    (source / "annotations").mkdir(parents=True)
    (source / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "coins.png"}], "annotations": 7})
    )

    with pytest.raises(ValueError, match="'annotations' list"):
        build_dataset("coco", source, tmp_path / "out")


def test_cli_output_path_is_file_exits_cleanly(tmp_path, photos):
    source = _source(
        tmp_path / "source",
        photos,
        "train.jsonl",
        [_line("images/coins.png", "Coins.")],
    )
    target = tmp_path / "a_file"
    target.write_text("not a folder")

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bt_jax.data",
            "build",
            "jsonl",
            str(source),
            "--out",
            str(target),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


def test_build_recovers_after_killed_rebuild(tmp_path, photos):
    lines = [
        _line(f"images/{number}.png", f"Coins number {number}.")
        for number in range(120)
    ]
    source = tmp_path / "source"
    for number in range(120):
        copy_photo(photos["astronaut"], source / "images" / f"{number}.png")
    (source / "train.jsonl").write_bytes(b"".join(lines))
    out = tmp_path / "out"
    dataset = build_dataset("jsonl", source, out)

    rebuild = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bt_jax.data",
            "build",
            "jsonl",
            str(source),
            "--out",
            str(out),
            "--overwrite",
            "--threads",
            "1",
        ],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    set_aside = dataset.with_name(f".{dataset.name}.previous")
    deadline = time.monotonic() + 60
    while not set_aside.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    rebuild.send_signal(signal.SIGKILL)
    rebuild.wait(timeout=60)
    assert set_aside.exists(), "the rebuild was not killed midway"

    rebuilt = build_dataset("jsonl", source, out, overwrite=True)

    assert len(open_records(rebuilt, "train")) == 120
    assert not set_aside.exists()
    assert not list(dataset.parent.glob("incomplete.*"))


def test_answer_vocab_file_labels_must_be_dense(tmp_path):
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"yes": 0, "no": 2, "red": 5}))

    with pytest.raises(ValueError, match="integers 0 to 2"):
        _load_answer_vocab(vocab_file)


def test_answer_vocab_file_mapping_in_label_order(tmp_path):
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"red": 2, "yes": 0, "no": 1}))

    assert _load_answer_vocab(vocab_file) == ["yes", "no", "red"]


def test_check_answer_vocab_rejects_empty_and_repeats():
    with pytest.raises(ValueError, match="empty"):
        check_answer_vocab([])
    with pytest.raises(ValueError, match="repeats"):
        check_answer_vocab(["yes", "yes"])


def test_check_answer_vocab_warns_on_raw_answers(caplog):
    with caplog.at_level(logging.WARNING):
        check_answer_vocab(["yes", "Red"])

    assert "'Red' -> 'red'" in caplog.text


def test_load_tokenizer_rejects_wordpiece(tmp_path):
    from tokenizers import BertWordPieceTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(
        ["a cat sits on a mat", "a dog runs"] * 20,
        vocab_size=100,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    wordpiece.save(str(folder / "tokenizer.json"))

    with pytest.raises(ValueError, match="WordPiece"):
        load_tokenizer(folder)


def test_open_records_negative_index(tmp_path, photos):
    lines = [
        _line("images/coins.png", "Coins."),
        _line("images/camera.png", "A camera."),
    ]
    source = _source(tmp_path / "source", photos, "train.jsonl", lines)
    records = open_records(build_dataset("jsonl", source, tmp_path / "out"), "train")

    assert records[-1]["texts"] == ["A camera."]
    with pytest.raises(IndexError):
        records[-3]


def test_open_records_file_instead_of_folder(tmp_path):
    file = tmp_path / "dataset.txt"
    file.write_text("x")

    with pytest.raises(ValueError, match="is a file"):
        open_records(file, "train")
