"""NLVR2 and SNLI-VE: official layouts in, labelled records and batches out.

The sources are written by `write_nlvr2_fixture` and `write_snli_ve_fixture`
in `tests/data_fixtures.py`, whose tables hold the hand-written class of every
text. Pixel values are compared with the image processor called directly on
the source files' bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from data_fixtures import (
    ExpectedRecord,
    TaskSource,
    write_nlvr2_fixture,
    write_snli_ve_fixture,
)

from bt_jax.data import (
    BtNlvr2,
    BtSnliVe,
    PipelineConfig,
    build_dataset,
    make_pipeline,
    open_records,
)
from bt_jax.data.__main__ import build_parser
from bt_jax.data.build import dataset_statistics, format_statistics
from bt_jax.data.reading import BT_JAX_FIELDS, Records, load_metadata
from bt_jax.processing import (
    BridgeTowerImageProcessor,
    BridgeTowerProcessor,
    load_image,
    train_tokenizer,
)

IMAGE_SIZE = 32
TEXT_LENGTH = 16
SINGLE_HOST = {"shard_index": 0, "shard_count": 1}


def config(**overrides) -> PipelineConfig:
    settings = {
        "global_batch_size": 2,
        "max_text_length": TEXT_LENGTH,
        "seed": 3,
        "num_epochs": 1,
        "drop_remainder": False,
    }
    settings.update(overrides)
    return PipelineConfig(**settings)


def run_pipeline(records, processor, **overrides):
    """Return every example of one epoch and the iterator's skip list."""
    iterator = iter(
        make_pipeline(records, processor, config(**overrides), **SINGLE_HOST)
    )
    examples = []
    for batch in iterator:
        for row in range(len(batch["record_index"])):
            examples.append({key: value[row] for key, value in batch.items()})
    return examples, iterator.skipped


def processed(image_processor, data: bytes) -> np.ndarray:
    """Return the image processor's output for one encoded image."""
    return image_processor(load_image(data))["pixel_values"][0]


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_records_match(records: Records, expected: list[ExpectedRecord]) -> None:
    assert len(records) == len(expected), "number of records"
    for index, want in enumerate(expected):
        record = records[index]
        where = f"record {index} ({want.id})"
        assert record["id"] == want.id, f"{where}: id"
        assert record["texts"] == want.texts, f"{where}: texts"
        assert record["text_ids"] == want.text_ids, f"{where}: text ids"
        assert record["labels"] == want.extra["labels"], f"{where}: labels"
        assert record["image"] == want.image, f"{where}: image bytes"
        if "image_2" in want.extra:
            same = record["image_2"] == want.extra["image_2"]
            assert same, f"{where}: second image bytes"
        else:
            assert "image_2" not in record, f"{where}: unexpected second image"


def skip_reasons(dataset: Path, split: str) -> dict[str, str]:
    return dict(load_metadata(dataset)["skipped_ids"][split])


def assert_skips_listed(dataset: Path, source: TaskSource) -> None:
    for split, skips in source.skips.items():
        entries = load_metadata(dataset)["skipped_ids"][split]
        for record_id, word in skips:
            found = [
                reason
                for skip_id, reason in entries
                if record_id in skip_id and word in reason
            ]
            assert len(found) == 1, f"{split}: skip of {record_id} ({word})"
        assert len(entries) == len(skips), f"{split}: number of skips"


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory) -> tuple[TaskSource, Path]:
    base = tmp_path_factory.mktemp("nlvr2")
    source = write_nlvr2_fixture(base / "source")
    dataset = build_dataset("nlvr2", source.root, base / "out", num_threads=2)
    return source, Path(dataset)


@pytest.fixture(scope="module")
def nlvr2_unverified(nlvr2, tmp_path_factory) -> Path:
    """The faulty NLVR2 source built without decoding its images."""
    source, _ = nlvr2
    out = tmp_path_factory.mktemp("nlvr2_unverified")
    return Path(build_dataset("nlvr2", source.root, out, verify_images=False))


@pytest.fixture(scope="module")
def snli_ve(tmp_path_factory) -> tuple[TaskSource, Path]:
    base = tmp_path_factory.mktemp("snli_ve")
    source = write_snli_ve_fixture(base / "source")
    dataset = build_dataset("snli-ve", source.root, base / "out", num_threads=2)
    return source, Path(dataset)


@pytest.fixture(scope="module")
def processor(nlvr2, snli_ve, tmp_path_factory) -> BridgeTowerProcessor:
    texts = [
        text
        for source, _ in (nlvr2, snli_ve)
        for records in source.expected.values()
        for record in records
        for text in record.texts
    ]
    tokenizer = train_tokenizer(
        texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=1000
    )
    image_processor = BridgeTowerImageProcessor(size={"shortest_edge": IMAGE_SIZE})
    return BridgeTowerProcessor(image_processor, tokenizer, max_text_length=40)


# -- NLVR2 builds --------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "dev", "test1"])
def test_nlvr2_build_reads_back_records(nlvr2, split):
    source, dataset = nlvr2

    assert_records_match(open_records(dataset, split), source.expected[split])


def test_nlvr2_build_stores_hand_written_labels(nlvr2):
    _, dataset = nlvr2
    records = open_records(dataset, "train")

    assert records[0]["labels"] == [1, 0]
    assert records[1]["labels"] == [0, 1, 1]
    assert records.label_names == ["False", "True"]


def test_nlvr2_build_lists_skips(nlvr2):
    source, dataset = nlvr2

    assert_skips_listed(dataset, source)
    assert load_metadata(dataset)["skipped"]["train"] == {
        "corrupt image": 2,
        "duplicate id": 1,
        "invalid label": 1,
        "invalid record": 1,
        "missing image": 1,
    }


def test_nlvr2_build_skip_names_second_image(nlvr2):
    _, dataset = nlvr2
    reasons = skip_reasons(dataset, "train")

    assert "second image" in reasons["train-600-0"]
    assert "train-600-0-img1.png" in reasons["train-600-0"]
    assert "second image" in reasons["train-602-0"]
    assert "train-602-0-img1.png" in reasons["train-602-0"]
    assert "second image" not in reasons["train-601-2"]
    assert "train-601-2-img0.png" in reasons["train-601-2"]


def test_nlvr2_build_reads_original_dev_layout(nlvr2):
    source, dataset = nlvr2
    # The fixture writes dev images to dev/, not images/dev/.
    assert (source.root / "dev" / "dev-850-0-img0.png").is_file()

    assert open_records(dataset, "dev")[0]["image"] == source.expected["dev"][0].image


def test_nlvr2_open_records_by_registered_name(nlvr2):
    _, dataset = nlvr2
    data_dir = dataset.parent.parent

    records = open_records("bt_nlvr2", "dev", data_dir=data_dir)

    assert BtNlvr2.name == "bt_nlvr2"
    assert [records[i]["id"] for i in range(len(records))] == ["dev-850-0"]


def test_nlvr2_build_without_faults_skips_nothing(tmp_path):
    source = write_nlvr2_fixture(tmp_path / "source", faults=False, extra_pairs=3)
    dataset = build_dataset("nlvr2", source.root, tmp_path / "out", num_threads=2)

    records = open_records(dataset, "train")

    assert len(records) == 5
    assert records[4]["labels"] == [1, 0]
    assert load_metadata(dataset)["skipped"] == {}


# -- SNLI-VE builds ------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_snli_ve_build_reads_back_records(snli_ve, split):
    source, dataset = snli_ve

    assert_records_match(open_records(dataset, split), source.expected[split])


def test_snli_ve_build_labels_follow_original_order(snli_ve):
    _, dataset = snli_ve
    records = open_records(dataset, "train")

    # Hypotheses of 1000092795: entailment, neutral, contradiction.
    assert records[0]["labels"] == [2, 1, 0]
    # Hypotheses of 10002456: contradiction, entailment.
    assert records[1]["labels"] == [0, 2]
    assert records.label_names == ["contradiction", "neutral", "entailment"]


def test_snli_ve_build_lists_skips(snli_ve):
    source, dataset = snli_ve

    assert_skips_listed(dataset, source)
    assert load_metadata(dataset)["skipped"]["train"] == {
        "corrupt image": 1,
        "invalid label": 1,
        "missing image": 1,
        "no gold label": 1,
    }


@pytest.mark.parametrize("folder", ["Flickr30K/flickr30k_images", "images"])
def test_snli_ve_build_finds_image_folder(tmp_path, folder):
    source = write_snli_ve_fixture(
        tmp_path / "source", faults=False, image_folder=folder
    )
    dataset = build_dataset("snli-ve", source.root, tmp_path / "out", num_threads=2)

    assert_records_match(open_records(dataset, "dev"), source.expected["dev"])
    assert load_metadata(dataset)["skipped"] == {}


def test_snli_ve_build_without_image_folder_raises(tmp_path):
    source = write_snli_ve_fixture(tmp_path / "source", faults=False)
    (source.root / "flickr30k_images").rename(source.root / "photos")

    with pytest.raises(FileNotFoundError, match="flickr30k_images"):
        build_dataset("snli-ve", source.root, tmp_path / "out")


def test_snli_ve_registered_name():
    assert BtSnliVe.name == "bt_snli_ve"


def test_snli_ve_statistics_count_labels(snli_ve):
    _, dataset = snli_ve

    stats = dataset_statistics(dataset, progress=False)

    assert stats["task"] == "snli-ve"
    assert stats["splits"]["train"]["labels"] == {
        "contradiction": 2,
        "neutral": 1,
        "entailment": 2,
    }
    assert "contradiction: 2" in format_statistics(stats)


@pytest.mark.parametrize("format", ["nlvr2", "snli-ve"])
def test_cli_build_accepts_task_format(format):
    args = build_parser().parse_args(["build", format, "source", "--out", "out"])

    assert args.format == format


# -- task detection ------------------------------------------------------------


def test_records_task_of_built_datasets(nlvr2, snli_ve):
    assert open_records(nlvr2[1], "dev").task == "nlvr2"
    assert open_records(snli_ve[1], "dev").task == "snli-ve"


@pytest.mark.parametrize(
    ("metadata", "task"),
    [
        ({}, "captions"),
        ({"format": "jsonl"}, "captions"),
        ({"format": "karpathy"}, "captions"),
        ({"format": "vqa"}, "vqa"),
        ({"format": "nlvr2", "task": "nlvr2"}, "nlvr2"),
        ({"format": "coco", "task": "captions"}, "captions"),
    ],
)
def test_records_task_from_metadata(metadata, task):
    records = Records([[]], BT_JAX_FIELDS, None, metadata, "train")

    assert records.task == task


def test_records_task_unknown_raises():
    records = Records([[]], BT_JAX_FIELDS, None, {"task": "ocr"}, "train")

    with pytest.raises(ValueError, match="'ocr'"):
        _ = records.task


# -- pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def nlvr2_examples(nlvr2, processor):
    _, dataset = nlvr2
    return run_pipeline(open_records(dataset, "train"), processor)


def test_nlvr2_pipeline_labels_match_sentences(nlvr2, nlvr2_examples):
    source, _ = nlvr2
    examples, skipped = nlvr2_examples
    expected = source.expected["train"]

    pairs = sorted((int(e["record_index"]), int(e["text_index"])) for e in examples)
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert skipped == []
    for example in examples:
        record, text = int(example["record_index"]), int(example["text_index"])
        want = expected[record].extra["labels"][text]
        assert example["labels"] == want, f"record {record}, text {text}"
        assert example["labels"].dtype == np.int32


def test_nlvr2_pipeline_second_image_matches_processor(
    nlvr2, nlvr2_examples, processor
):
    source, _ = nlvr2
    examples, _ = nlvr2_examples

    for example in examples:
        record = source.expected["train"][int(example["record_index"])]
        first = processed(processor.image_processor, record.image)
        second = processed(processor.image_processor, record.extra["image_2"])
        np.testing.assert_array_equal(
            example["pixel_values"], first, err_msg=f"{record.id}: first image"
        )
        np.testing.assert_array_equal(
            example["pixel_values_2"], second, err_msg=f"{record.id}: second image"
        )


def test_nlvr2_pipeline_pads_both_images(nlvr2, processor):
    source, dataset = nlvr2
    # At 32 pixels the longest-edge cap and the size divisor of 32 give every
    # fixture image 32 x 32; at 64 the pair's images come out 64 x 64 and 96 x 64.
    image_processor = BridgeTowerImageProcessor(
        size={"shortest_edge": 64}, do_center_crop=False
    )
    uncropped = BridgeTowerProcessor(
        image_processor, processor.tokenizer, max_text_length=40
    )

    examples, _ = run_pipeline(open_records(dataset, "dev"), uncropped)

    record = source.expected["dev"][0]
    images = {
        "": processed(image_processor, record.image),
        "_2": processed(image_processor, record.extra["image_2"]),
    }
    # The pair's images come out 64 x 64 and 96 x 64: both are padded to 96 x 64.
    padded_shape = (96, 64, 3)
    assert images[""].shape == (64, 64, 3)
    assert images["_2"].shape == (96, 64, 3)
    assert len(examples) == 2
    for example in examples:
        for suffix, image in images.items():
            height, width, _ = image.shape
            pixels = example[f"pixel_values{suffix}"]
            mask = example[f"pixel_mask{suffix}"]
            assert pixels.shape == padded_shape, f"pixel_values{suffix} shape"
            np.testing.assert_array_equal(pixels[:height, :width], image)
            assert not pixels[height:].any(), f"pixel_values{suffix} padding"
            assert not pixels[:, width:].any(), f"pixel_values{suffix} padding"
            assert mask[:height, :width].all(), f"pixel_mask{suffix}"
            assert mask.sum() == height * width, f"pixel_mask{suffix}"


def test_nlvr2_pipeline_skips_undecodable_images(nlvr2_unverified, processor):
    records = open_records(nlvr2_unverified, "train")

    examples, skipped = run_pipeline(records, processor)

    ids = [records[int(e["record_index"])]["id"] for e in examples]
    assert sorted(set(ids)) == ["train-10171-0", "train-52-1"]
    reasons = dict(skipped)
    assert sorted(reasons) == ["train-601-2", "train-602-0"]
    assert reasons["train-601-2"].startswith("corrupt image:")
    assert "second image" not in reasons["train-601-2"]
    assert reasons["train-602-0"].startswith("corrupt image: second image")


def test_nlvr2_pipeline_record_without_second_image_invalid(processor):
    def example(record_id: str, **fields):
        return {
            "image": png_bytes(len(record_id)),
            "image/id": record_id.encode(),
            "texts": [f"a sentence about {record_id}".encode()],
            "text_ids": [f"{record_id}-0".encode()],
            **fields,
        }

    good = example("good", image_2=png_bytes(1), labels=np.asarray([1], np.int32))
    one_image = example("one-image", labels=np.asarray([0], np.int32))
    unlabelled = example("unlabelled", image_2=png_bytes(2))
    records = Records(
        [[good, one_image, unlabelled]],
        BT_JAX_FIELDS,
        None,
        {"task": "nlvr2"},
        "train",
    )

    examples, skipped = run_pipeline(records, processor, global_batch_size=1)

    assert [int(e["record_index"]) for e in examples] == [0]
    assert examples[0]["labels"] == 1
    reasons = dict(skipped)
    assert reasons["one-image"].startswith("missing image")
    assert reasons["unlabelled"].startswith("invalid record")


@pytest.fixture(scope="module")
def snli_ve_examples(snli_ve, processor):
    _, dataset = snli_ve
    return run_pipeline(open_records(dataset, "train"), processor)


def test_snli_ve_pipeline_labels_match_hypotheses(snli_ve, snli_ve_examples):
    source, _ = snli_ve
    examples, _ = snli_ve_examples
    expected = source.expected["train"]

    assert len(examples) == 5
    for example in examples:
        record, text = int(example["record_index"]), int(example["text_index"])
        want = expected[record].extra["labels"][text]
        assert example["labels"] == want, f"record {record}, text {text}"


def test_snli_ve_pipeline_inputs_match_hypothesis(snli_ve, snli_ve_examples, processor):
    source, _ = snli_ve
    examples, _ = snli_ve_examples

    for example in examples:
        record = source.expected["train"][int(example["record_index"])]
        text = record.texts[int(example["text_index"])]
        expected_ids = processor.tokenizer(
            text, padding="max_length", truncation=True, max_length=TEXT_LENGTH
        )["input_ids"]
        np.testing.assert_array_equal(example["input_ids"], expected_ids, err_msg=text)
        np.testing.assert_array_equal(
            example["pixel_values"],
            processed(processor.image_processor, record.image),
            err_msg=record.id,
        )
        assert "pixel_values_2" not in example
