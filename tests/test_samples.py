"""Sample photos: the packaged caption set, `materialize` and `read_jsonl`.

The checks run against the photos in the installed scikit-image wheel, so they
are skipped when scikit-image or Pillow is missing.
"""

import json
import logging
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage", reason="the sample photos come from scikit-image")
Image = pytest.importorskip("PIL.Image", reason="decoding the photos needs Pillow")

from bt_jax import samples  # noqa: E402

MIN_PHOTOS = 12
MIN_SIDE = 64


def test_samples_count_and_captions():
    photos = samples.load_samples()
    assert len(photos) >= MIN_PHOTOS
    for photo in photos:
        assert len(photo.captions) >= samples.MIN_CAPTIONS, photo.id
        for caption in photo.captions:
            assert caption.strip(), photo.id
        assert photo.license.strip(), photo.id


def test_samples_ids_unique():
    ids = [photo.id for photo in samples.load_samples()]
    assert len(ids) == len(set(ids))


def test_samples_captions_unique():
    captions = [
        caption.casefold().strip()
        for photo in samples.load_samples()
        for caption in photo.captions
    ]
    duplicates = sorted({c for c in captions if captions.count(c) > 1})
    assert not duplicates


def test_samples_caption_style():
    # One COCO-style sentence: 6 to 20 words, capitalised, ending with a period.
    for photo in samples.load_samples():
        for caption in photo.captions:
            assert 6 <= len(caption.split()) <= 20, caption
            assert caption[0].isupper(), caption
            assert caption.endswith("."), caption


def test_samples_files_decode():
    grayscale = 0
    for photo in samples.load_samples():
        path = photo.path()
        assert path.is_file(), path
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            mode = image.mode
        assert width >= MIN_SIDE, (photo.id, image.size)
        assert height >= MIN_SIDE, (photo.id, image.size)
        assert mode in {"L", "RGB"}, (photo.id, mode)
        grayscale += mode == "L"
    assert grayscale >= 2


def test_materialize_copies_bytes(tmp_path):
    photos = samples.load_samples()
    jsonl = samples.materialize(tmp_path / "out")

    assert jsonl == (tmp_path / "out" / "captions.jsonl").absolute()
    for photo in photos:
        copy = tmp_path / "out" / "images" / photo.file
        assert copy.read_bytes() == photo.path().read_bytes(), photo.file
    written = sorted(path.name for path in (tmp_path / "out" / "images").iterdir())
    assert written == sorted(photo.file for photo in photos)


def test_materialize_jsonl_lines(tmp_path):
    photos = samples.load_samples()
    jsonl = samples.materialize(tmp_path / "out")

    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == sum(len(photo.captions) for photo in photos)
    expected = [
        {
            "image": f"images/{photo.file}",
            "caption": caption,
            "id": f"{photo.id}/{number}",
            "photo": photo.id,
        }
        for photo in photos
        for number, caption in enumerate(photo.captions)
    ]
    assert [json.loads(line) for line in lines] == expected


def test_materialize_read_jsonl_paths(tmp_path):
    photos = {photo.id: photo for photo in samples.load_samples()}
    jsonl = samples.materialize(tmp_path / "out")

    records = samples.read_jsonl(jsonl)
    assert len(records) == sum(len(photo.captions) for photo in photos.values())
    images = (tmp_path / "out" / "images").resolve()
    for record in records:
        photo = photos[record["photo"]]
        image = Path(record["image"])
        assert image.is_absolute(), image
        assert image == images / photo.file
        assert image.read_bytes() == photo.path().read_bytes()
        assert record["caption"] in photo.captions


def test_materialize_logs_counts(tmp_path, caplog):
    photos = samples.load_samples()
    with caplog.at_level(logging.INFO, logger="bt_jax.samples"):
        samples.materialize(tmp_path / "out")
    captions = sum(len(photo.captions) for photo in photos)
    assert f"{len(photos)} sample photos and {captions} captions" in caplog.text


def test_materialize_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    jsonl = samples.materialize(tmp_path / "out")
    assert jsonl.is_file()


def test_materialize_rejects_nonempty(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("existing data")

    with pytest.raises(FileExistsError, match="overwrite=True") as excinfo:
        samples.materialize(target)
    assert str(target) in str(excinfo.value)
    assert (target / "keep.txt").read_text() == "existing data"
    assert sorted(path.name for path in target.iterdir()) == ["keep.txt"]


def test_materialize_overwrite_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")

    jsonl = samples.materialize(target, overwrite=True)
    assert jsonl.is_file()
    assert not (target / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_materialize_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail_copy(source, destination):
        raise OSError("simulated copy failure")

    monkeypatch.setattr(samples.shutil, "copyfile", fail_copy)
    with pytest.raises(OSError, match="simulated copy failure"):
        samples.materialize(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_materialize_rejects_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        samples.materialize(target, overwrite=True)


def test_read_jsonl_malformed_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '{"image": "images/a.png", "caption": "first"}\n'
        "\n"
        '{"image": "images/b.png", "caption": broken}\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"captions\.jsonl:3: invalid JSON"):
        samples.read_jsonl(path)


def test_read_jsonl_not_object(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('["images/a.png", "caption"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions\.jsonl:1: expected a JSON object"):
        samples.read_jsonl(path)


def test_read_jsonl_missing_image(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text(
        '{"image": "a.png", "caption": "x"}\n{"caption": "y"}\n', encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: .*'image'"):
        samples.read_jsonl(path)


def test_read_jsonl_resolves_relative(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "captions.jsonl"
    path.write_text(
        '{"image": "images/a.png", "caption": "x", "extra": 1}\n', encoding="utf-8"
    )
    records = samples.read_jsonl(path)
    expected = str((tmp_path / "data" / "images" / "a.png").resolve())
    assert records == [{"image": expected, "caption": "x", "extra": 1}]


VALID_RECORD = {
    "id": "cat",
    "file": "chelsea.png",
    "captions": ["One caption here.", "Two captions here.", "Three captions here."],
    "license": "CC0",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"captions": ["Only one.", "Only two."]}, "2 captions found, at least 3"),
        ({"captions": ["One.", " ", "Three."]}, "non-empty string"),
        ({"file": "missing.png"}, r"pip install scikit-image==0\.26\.0"),
        ({"file": "../data/chelsea.png"}, "bare file name"),
        ({"license": ""}, "license is empty"),
        ({"captions": "One caption."}, "must be a list"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_parse_samples_invalid_record(change, message):
    record = {**VALID_RECORD, **change}
    text = json.dumps(VALID_RECORD | {"id": "first", "file": "coffee.png"})
    text += "\n" + json.dumps(record) + "\n"
    with pytest.raises(ValueError, match=message) as excinfo:
        samples._parse_samples(
            text, source="captions.jsonl", data_dir=samples._skimage_data_dir()
        )
    assert "captions.jsonl:2" in str(excinfo.value)
    assert "'cat'" in str(excinfo.value)


def test_parse_samples_missing_field():
    record = {key: value for key, value in VALID_RECORD.items() if key != "license"}
    with pytest.raises(ValueError, match=r"captions\.jsonl:1: record 'cat' is missing"):
        samples._parse_samples(
            json.dumps(record),
            source="captions.jsonl",
            data_dir=samples._skimage_data_dir(),
        )


def test_parse_samples_duplicate_id():
    text = json.dumps(VALID_RECORD) + "\n"
    text += json.dumps(VALID_RECORD | {"file": "coffee.png"}) + "\n"
    with pytest.raises(ValueError, match="duplicate id, also used on line 1"):
        samples._parse_samples(
            text, source="captions.jsonl", data_dir=samples._skimage_data_dir()
        )


def test_load_samples_without_skimage(monkeypatch):
    # A None entry in sys.modules makes `import skimage` raise ImportError.
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(
        ModuleNotFoundError, match=re.escape(samples.SKIMAGE_REQUIREMENT)
    ):
        samples.load_samples()
