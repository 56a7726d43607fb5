"""Tests of the grain batch pipeline on datasets built from the sample photos.

Expected values come from the source files, the tokenizer and the image
processor called directly, never from the pipeline's own output. The JSON
Lines source fixes which image and caption each (record, text) pair names,
because the builder writes records in order of each image's first line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

import bt_jax.samples
from bt_jax.data import (
    PipelineConfig,
    build_dataset,
    make_pipeline,
    mask_tokens,
    open_records,
)
from bt_jax.processing import (
    BridgeTowerImageProcessor,
    BridgeTowerProcessor,
    load_image,
    train_tokenizer,
)

IGNORE_INDEX = -100
IMAGE_SIZE = 64
# The sample captions take 11 to 19 tokens with the tokenizer trained below, so
# a limit of 16 both truncates and pads.
TEXT_LENGTH = 16
BATCH_SIZE = 4
# Images that the corrupt-image tests damage: garbage bytes in a PNG and a
# JPEG cut off halfway.
GARBAGE_IMAGE = "images/coffee.png"
TRUNCATED_IMAGE = "images/rocket.jpg"
PIPELINE_LOGGER = "bt_jax.data.pipeline"


# -- helpers -------------------------------------------------------------------


def read_source(jsonl: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Return the images in order of first appearance and each image's captions."""
    captions = collections.defaultdict(list)
    with open(jsonl, encoding="utf-8") as file:
        for line in file:
            entry = json.loads(line)
            captions[entry["image"]].append(entry["caption"])
    return list(captions), dict(captions)


def config(**overrides) -> PipelineConfig:
    settings = {
        "global_batch_size": BATCH_SIZE,
        "max_text_length": TEXT_LENGTH,
        "seed": 7,
        "num_epochs": 1,
        "drop_remainder": False,
    }
    settings.update(overrides)
    return PipelineConfig(**settings)


def take(iterator, count: int | None = None) -> list[dict[str, np.ndarray]]:
    """Return the next `count` batches of `iterator`, or all remaining ones."""
    batches = []
    for batch in iterator:
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def run(records, processor, pipeline_config, **shard) -> list[dict[str, np.ndarray]]:
    shard = shard or {"shard_index": 0, "shard_count": 1}
    return take(iter(make_pipeline(records, processor, pipeline_config, **shard)))


def pairs_of(batches) -> list[tuple[int, int]]:
    """Return the (record_index, text_index) of every example, in stream order."""
    pairs = []
    for batch in batches:
        for record, text in zip(
            batch["record_index"], batch["text_index"], strict=True
        ):
            pairs.append((int(record), int(text)))
    return pairs


def examples_of(batches):
    """Yield each example of `batches` as a dict of per-example arrays."""
    for batch in batches:
        for row in range(len(batch["record_index"])):
            yield {key: value[row] for key, value in batch.items()}


def assert_batches_equal(actual, expected) -> None:
    assert len(actual) == len(expected), "different numbers of batches"
    for number, (left, right) in enumerate(zip(actual, expected, strict=True)):
        assert sorted(left) == sorted(right), f"batch {number} has other keys"
        for key in right:
            np.testing.assert_array_equal(
                left[key], right[key], err_msg=f"batch {number}, {key}"
            )


def corrupt_images(source: Path) -> None:
    """Overwrite one image with garbage bytes and cut another off halfway."""
    (source / GARBAGE_IMAGE).write_bytes(b"this is not an image" * 50)
    jpeg = (source / TRUNCATED_IMAGE).read_bytes()
    (source / TRUNCATED_IMAGE).write_bytes(jpeg[: len(jpeg) // 2])


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The sample photos as a JSON Lines source folder with a train split."""
    folder = tmp_path_factory.mktemp("pipeline") / "source"
    captions = bt_jax.samples.materialize(folder)
    captions.rename(folder / "train.jsonl")
    return folder


@pytest.fixture(scope="module")
def source_layout(source):
    return read_source(source / "train.jsonl")


@pytest.fixture(scope="module")
def all_pairs(source_layout) -> set[tuple[int, int]]:
    images, captions = source_layout
    return {
        (record, text)
        for record, image in enumerate(images)
        for text in range(len(captions[image]))
    }


@pytest.fixture(scope="module")
def records(source):
    out = build_dataset("jsonl", source, source.parent / "built")
    return open_records(out, "train")


@pytest.fixture(scope="module")
def processor(source_layout, tmp_path_factory) -> BridgeTowerProcessor:
    _, captions = source_layout
    texts = [text for image_captions in captions.values() for text in image_captions]
    tokenizer = train_tokenizer(
        texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=1000
    )
    image_processor = BridgeTowerImageProcessor(size={"shortest_edge": IMAGE_SIZE})
    return BridgeTowerProcessor(image_processor, tokenizer, max_text_length=40)


@pytest.fixture(scope="module")
def corrupt_source(source) -> Path:
    folder = source.parent / "corrupt_source"
    shutil.copytree(source, folder)
    corrupt_images(folder)
    return folder


@pytest.fixture(scope="module")
def corrupt_records(corrupt_source):
    out = build_dataset(
        "jsonl",
        corrupt_source,
        corrupt_source.parent / "corrupt_built",
        verify_images=False,
    )
    return open_records(out, "train")


@pytest.fixture(scope="module")
def epoch(records, processor) -> list[dict[str, np.ndarray]]:
    """One shuffled epoch with MLM on, read by a single host."""
    return run(records, processor, config())


# -- determinism and epochs ----------------------------------------------------


def test_pipeline_same_seed_identical_batches(records, processor, epoch):
    again = run(records, processor, config())

    assert_batches_equal(again, epoch)


def test_pipeline_seed_changes_order(records, processor, epoch):
    other = run(records, processor, config(seed=8))

    assert pairs_of(other) != pairs_of(epoch)
    assert sorted(pairs_of(other)) == sorted(pairs_of(epoch))


def test_pipeline_epoch_visits_every_pair_once(epoch, all_pairs):
    pairs = pairs_of(epoch)

    assert len(pairs) == len(all_pairs)
    assert set(pairs) == all_pairs


def test_pipeline_shuffles_each_epoch_differently(records, processor, all_pairs):
    # A global batch of 2 divides the 58 pairs, so no pair is trimmed.
    batches = run(
        records,
        processor,
        config(global_batch_size=2, num_epochs=2, drop_remainder=True),
    )
    pairs = pairs_of(batches)
    first, second = pairs[: len(all_pairs)], pairs[len(all_pairs) :]

    assert len(pairs) == 2 * len(all_pairs)
    assert sorted(first) == sorted(all_pairs)
    assert sorted(second) == sorted(all_pairs)
    assert first != second


def test_pipeline_drop_remainder_trims_partial_batch(records, processor, all_pairs):
    batches = run(records, processor, config(drop_remainder=True))
    pairs = pairs_of(batches)

    assert len(pairs) == len(all_pairs) // BATCH_SIZE * BATCH_SIZE
    assert all(len(batch["record_index"]) == BATCH_SIZE for batch in batches)
    assert len(set(pairs)) == len(pairs)
    assert set(pairs) <= all_pairs


def test_pipeline_one_text_mode_visits_each_image(records, processor, source_layout):
    images, captions = source_layout
    batches = run(
        records, processor, config(texts="one", global_batch_size=5, num_epochs=4)
    )
    pairs = pairs_of(batches)
    draws = collections.defaultdict(set)
    for record, text in pairs:
        draws[record].add(text)

    assert len(pairs) == 4 * len(images)
    for start in range(0, len(pairs), len(images)):
        visited = sorted(record for record, _ in pairs[start : start + len(images)])
        assert visited == list(range(len(images))), f"epoch from {start}"
    for record, texts in draws.items():
        assert texts <= set(range(len(captions[images[record]]))), record
    # With four random draws from 3 or 4 captions per image, the chance that
    # every image gets the same text four times is below 1e-10.
    assert any(len(texts) > 1 for texts in draws.values())


# -- resuming ------------------------------------------------------------------


RESUME_CONFIG = config(num_epochs=2)


@pytest.fixture(scope="module")
def two_epochs(records, processor) -> list[dict[str, np.ndarray]]:
    return run(records, processor, RESUME_CONFIG)


@pytest.mark.parametrize("stop", [5, 19])
def test_pipeline_resume_same_pipeline_matches_uninterrupted(
    records, processor, two_epochs, stop
):
    pipeline = make_pipeline(
        records, processor, RESUME_CONFIG, shard_index=0, shard_count=1
    )
    first = iter(pipeline)
    take(first, stop)
    state = first.get_state()

    resumed = iter(pipeline)
    resumed.set_state(state)

    assert_batches_equal(take(resumed), two_epochs[stop:])


def test_pipeline_resume_new_pipeline_matches_uninterrupted(
    records, processor, two_epochs
):
    stop = 9
    first = iter(
        make_pipeline(records, processor, RESUME_CONFIG, shard_index=0, shard_count=1)
    )
    take(first, stop)
    # The state goes through JSON, as it does in a checkpoint.
    state = json.loads(json.dumps(first.get_state()))

    resumed = iter(
        make_pipeline(records, processor, RESUME_CONFIG, shard_index=0, shard_count=1)
    )
    resumed.set_state(state)

    assert_batches_equal(take(resumed), two_epochs[stop:])


def test_pipeline_orbax_resume_matches_uninterrupted(
    records, processor, two_epochs, tmp_path
):
    stop = 17
    first = iter(
        make_pipeline(records, processor, RESUME_CONFIG, shard_index=0, shard_count=1)
    )
    take(first, stop)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(
            stop,
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)),
        )
        manager.wait_until_finished()
    # Moving the saved iterator on must not change what the checkpoint holds.
    take(first, 3)

    resumed = iter(
        make_pipeline(records, processor, RESUME_CONFIG, shard_index=0, shard_count=1)
    )
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.latest_step() == stop
        manager.restore(
            stop,
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)),
        )

    assert_batches_equal(take(resumed), two_epochs[stop:])


# -- sharding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_batches(records, processor) -> list[list[dict[str, np.ndarray]]]:
    return [
        run(records, processor, config(), shard_index=index, shard_count=2)
        for index in range(2)
    ]


def test_pipeline_shards_partition_pairs(shard_batches, all_pairs):
    first, second = (pairs_of(batches) for batches in shard_batches)

    assert len(first) + len(second) == len(all_pairs)
    assert set(first) | set(second) == all_pairs
    assert len(set(first) | set(second)) == len(first) + len(second)


def test_pipeline_shard_halves_disjoint(shard_batches):
    first, second = shard_batches

    # A final partial global batch fills host 0's block first, so host 1 can
    # have one batch fewer.
    assert len(first) - len(second) in (0, 1)
    for number, (left, right) in enumerate(zip(first, second, strict=False)):
        assert not set(pairs_of([left])) & set(pairs_of([right])), number


def test_pipeline_shards_match_single_host(shard_batches, epoch):
    # Host i of n reads block i of each global batch, so the two hosts' batches
    # one after the other rebuild the single host's batch, masks included.
    first, second = shard_batches
    second = second + [None] * (len(first) - len(second))
    for number, (left, right, whole) in enumerate(
        zip(first, second, epoch, strict=True)
    ):
        for key in ("record_index", "text_index", "input_ids", "mlm_input_ids"):
            parts = [left[key]] if right is None else [left[key], right[key]]
            joined = np.concatenate(parts)
            np.testing.assert_array_equal(
                joined, whole[key], err_msg=f"batch {number}, {key}"
            )


# -- content -------------------------------------------------------------------


def test_pipeline_pixels_match_image_processor(epoch, processor, source_layout, source):
    images, _ = source_layout
    expected = {
        record: processor.image_processor(load_image(source / image))["pixel_values"][0]
        for record, image in enumerate(images)
    }

    assert epoch[0]["pixel_values"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    for example in examples_of(epoch):
        record = int(example["record_index"])
        np.testing.assert_array_equal(
            example["pixel_values"], expected[record], err_msg=images[record]
        )


def test_pipeline_pads_uncropped_images(records, processor, source_layout, source):
    images, _ = source_layout
    image_processor = BridgeTowerImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, do_center_crop=False
    )
    uncropped = BridgeTowerProcessor(image_processor, processor.tokenizer)
    batches = take(
        iter(make_pipeline(records, uncropped, config(), shard_index=0, shard_count=1)),
        4,
    )
    shapes = set()
    for example in examples_of(batches):
        image = images[int(example["record_index"])]
        expected = image_processor(load_image(source / image))["pixel_values"][0]
        height, width = expected.shape[:2]
        shapes.add((height, width))

        np.testing.assert_array_equal(
            example["pixel_values"][:height, :width], expected, err_msg=image
        )
        assert not example["pixel_values"][height:].any(), image
        assert not example["pixel_values"][:, width:].any(), image
        assert example["pixel_mask"][:height, :width].all(), image
        assert example["pixel_mask"].sum() == height * width, image
    # The 16 examples include images of different shapes, so padding happened.
    assert len(shapes) > 1


def test_pipeline_tokens_match_tokenizer(epoch, processor, source_layout):
    images, captions = source_layout
    lengths = []
    for example in examples_of(epoch):
        record, text = int(example["record_index"]), int(example["text_index"])
        caption = captions[images[record]][text]
        expected = processor.tokenizer(
            caption, padding="max_length", truncation=True, max_length=TEXT_LENGTH
        )
        lengths.append(len(processor.tokenizer(caption)["input_ids"]))

        np.testing.assert_array_equal(
            example["input_ids"], expected["input_ids"], err_msg=caption
        )
        np.testing.assert_array_equal(
            example["attention_mask"], expected["attention_mask"], err_msg=caption
        )
    # Both truncation and padding took place in this epoch.
    assert max(lengths) > TEXT_LENGTH
    assert min(lengths) < TEXT_LENGTH


def test_pipeline_mlm_labels_mark_masked_positions(epoch, processor):
    tokenizer = processor.tokenizer
    never_selected = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    selected_total = maskable_total = mask_tokens_seen = 0
    for example in examples_of(epoch):
        input_ids = example["input_ids"]
        labels = example["mlm_labels"]
        masked = example["mlm_input_ids"]
        selected = labels != IGNORE_INDEX
        special = np.isin(input_ids, never_selected) | (example["attention_mask"] == 0)

        np.testing.assert_array_equal(labels[selected], input_ids[selected])
        assert not (selected & special).any(), input_ids
        np.testing.assert_array_equal(masked[~selected], input_ids[~selected])
        selected_total += int(selected.sum())
        maskable_total += int((~special).sum())
        mask_tokens_seen += int((masked[selected] == tokenizer.mask_token_id).sum())

    # About 750 maskable tokens: 15% of them is 112 +- 10 (one standard deviation).
    assert 0.10 < selected_total / maskable_total < 0.20
    assert mask_tokens_seen > 0.5 * selected_total


def test_pipeline_without_mlm_has_no_mlm_arrays(records, processor, epoch):
    batches = take(
        iter(
            make_pipeline(
                records,
                processor,
                config(mlm_probability=0.0),
                shard_index=0,
                shard_count=1,
            )
        ),
        2,
    )

    assert "mlm_input_ids" not in batches[0]
    assert "mlm_labels" not in batches[0]
    np.testing.assert_array_equal(batches[1]["input_ids"], epoch[1]["input_ids"])


# -- mask_tokens ---------------------------------------------------------------


MASK_ID = 4
VOCAB_SIZE = 1000


@pytest.fixture(scope="module")
def masking():
    """200,000 token ids with the first column and the last ten special."""
    input_ids = np.random.default_rng(1).integers(
        MASK_ID + 1, VOCAB_SIZE, size=(2000, 100), dtype=np.int32
    )
    special = np.zeros(input_ids.shape, bool)
    special[:, 0] = True
    special[:, -10:] = True
    masked, labels = mask_tokens(
        input_ids,
        special,
        np.random.default_rng(0),
        mask_token_id=MASK_ID,
        vocab_size=VOCAB_SIZE,
    )
    return input_ids, special, masked, labels


def test_mask_tokens_selection_rate(masking):
    input_ids, special, _, labels = masking
    selected = labels != IGNORE_INDEX

    # 178,000 candidates: one standard deviation of the rate is 0.085%.
    assert abs(selected[~special].mean() - 0.15) < 0.003
    assert not (selected & special).any()
    np.testing.assert_array_equal(labels[selected], input_ids[selected])
    assert labels.dtype == input_ids.dtype


def test_mask_tokens_replacement_shares(masking):
    input_ids, _, masked, labels = masking
    selected = labels != IGNORE_INDEX
    original = input_ids[selected]
    replaced = masked[selected]
    as_mask = replaced == MASK_ID
    unchanged = replaced == original
    randomized = ~as_mask & ~unchanged

    # About 26,700 selected tokens: one standard deviation is 0.25% for the
    # 80% share and 0.18% for the 10% shares. A random draw equals the
    # original token 0.1% of the time, which moves 0.01% into "unchanged".
    assert abs(as_mask.mean() - 0.8) < 0.01
    assert abs(randomized.mean() - 0.1) < 0.008
    assert abs(unchanged.mean() - 0.1) < 0.008
    assert replaced[randomized].min() >= 0
    assert replaced[randomized].max() < VOCAB_SIZE
    assert abs(replaced[randomized].mean() - VOCAB_SIZE / 2) < 0.05 * VOCAB_SIZE
    np.testing.assert_array_equal(masked[~selected], input_ids[~selected])
    assert masked.dtype == input_ids.dtype


def test_mask_tokens_zero_probability_selects_nothing(masking):
    input_ids, special, _, _ = masking
    masked, labels = mask_tokens(
        input_ids,
        special,
        np.random.default_rng(0),
        mask_token_id=MASK_ID,
        vocab_size=VOCAB_SIZE,
        probability=0.0,
    )

    assert (labels == IGNORE_INDEX).all()
    np.testing.assert_array_equal(masked, input_ids)


# -- corrupt images ------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(source_layout) -> set[tuple[int, int]]:
    """The pairs whose image the corrupt dataset damages."""
    images, captions = source_layout
    return {
        (images.index(image), text)
        for image in (GARBAGE_IMAGE, TRUNCATED_IMAGE)
        for text in range(len(captions[image]))
    }


# Seed 3 puts skips before and after the restore test's checkpoint at batch 6,
# and the stream ends with a valid pair. A stream that ends with skips is
# covered by test_pipeline_counts_skips_at_stream_end.
CORRUPT_CONFIG = config(seed=3)


def test_pipeline_skips_corrupt_images(
    corrupt_records, processor, source_layout, all_pairs, bad, caplog
):
    images, captions = source_layout
    caplog.set_level(logging.WARNING, logger=PIPELINE_LOGGER)
    iterator = iter(
        make_pipeline(
            corrupt_records, processor, CORRUPT_CONFIG, shard_index=0, shard_count=1
        )
    )
    pairs = pairs_of(take(iterator))
    skipped_ids = collections.Counter(record_id for record_id, _ in iterator.skipped)
    logged = "\n".join(record.getMessage() for record in caplog.records)

    assert len(corrupt_records) == len(images)
    assert not set(pairs) & bad
    assert sorted(pairs) == sorted(all_pairs - bad)
    assert skipped_ids == {
        GARBAGE_IMAGE: len(captions[GARBAGE_IMAGE]),
        TRUNCATED_IMAGE: len(captions[TRUNCATED_IMAGE]),
    }
    assert all("corrupt image" in reason for _, reason in iterator.skipped)
    assert iterator.skipped_total == len(bad)
    assert GARBAGE_IMAGE in logged
    assert TRUNCATED_IMAGE in logged


def test_pipeline_skip_count_survives_restore(
    corrupt_records, processor, bad, tmp_path
):
    pipeline_config = CORRUPT_CONFIG
    uninterrupted = iter(
        make_pipeline(
            corrupt_records, processor, pipeline_config, shard_index=0, shard_count=1
        )
    )
    reference = take(uninterrupted)
    stop = 6

    first = iter(
        make_pipeline(
            corrupt_records, processor, pipeline_config, shard_index=0, shard_count=1
        )
    )
    head = take(first, stop)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        tmp_path / "checkpoint",
        args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)),
    )
    resumed = iter(
        make_pipeline(
            corrupt_records, processor, pipeline_config, shard_index=0, shard_count=1
        )
    )
    checkpointer.restore(
        tmp_path / "checkpoint",
        args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)),
    )
    skipped_at_restore = resumed.skipped_total
    tail = take(resumed)

    skipped_in_head = first.skipped_total
    assert 0 < skipped_in_head < len(bad)
    assert skipped_at_restore == skipped_in_head
    assert resumed.skipped_total == len(bad)
    assert uninterrupted.skipped_total == len(bad)
    assert_batches_equal(head + tail, reference)


def test_pipeline_counts_skips_at_stream_end(
    corrupt_source, processor, source_layout, bad, tmp_path
):
    # The last image of the source is corrupt and the pairs are not shuffled,
    # so the stream ends with that image's captions.
    images, captions = source_layout
    folder = tmp_path / "source"
    shutil.copytree(corrupt_source, folder)
    (folder / images[-1]).write_bytes(b"not an image either" * 50)
    out = build_dataset("jsonl", folder, tmp_path / "built", verify_images=False)
    records = open_records(out, "train")
    bad = bad | {(len(images) - 1, text) for text in range(len(captions[images[-1]]))}
    iterator = iter(
        make_pipeline(
            records, processor, config(shuffle=False), shard_index=0, shard_count=1
        )
    )
    pairs = pairs_of(take(iterator))

    assert len(pairs) + len(bad) == sum(len(texts) for texts in captions.values())
    assert iterator.skipped_total == len(bad)


# -- VQA -----------------------------------------------------------------------


VQA_VOCAB = ["orange", "red", "yes", "no", "1", "2", "cat"]
# image id -> sample photo saved as that COCO image.
VQA_IMAGES = {9: "astronaut.png", 42: "chelsea.png", 1234: "coffee.png"}
# question id -> (image id, question, the 10 annotators' answers).
VQA_QUESTIONS = {
    90: (9, "What color is the suit?", ["orange"] * 6 + ["red"] * 3 + ["yellow"]),
    91: (9, "Is this a person?", ["yes"] * 2 + ["Yes."] + ["no"] * 7),
    420: (
        42,
        "How many cats are there?",
        ["1", "1", "one", "One", "1 ", "2", "two", "cat", "a cat", "many"],
    ),
    421: (42, "Is the cat asleep?", ["no"] * 10),
    12340: (1234, "What is in the cup?", ["coffee"] * 8 + ["tea"] * 2),
}
# Soft scores by hand: an answer given by n of the 10 annotators scores
# min(1, 0.3 n) after the VQA normalisation ("Yes." -> "yes", "One" -> "1",
# "a cat" -> "cat"). Answers outside VQA_VOCAB score nothing.
VQA_SCORES = {
    90: {"orange": 1.0, "red": 0.9},
    91: {"yes": 0.9, "no": 1.0},
    420: {"1": 1.0, "2": 0.6, "cat": 0.6},
    421: {"no": 1.0},
    12340: {},
}


@pytest.fixture(scope="module")
def vqa_source(source) -> Path:
    folder = source.parent / "vqa_source"
    (folder / "train2014").mkdir(parents=True)
    for image_id, file in VQA_IMAGES.items():
        with PIL.Image.open(source / "images" / file) as image:
            image.convert("RGB").save(
                folder / "train2014" / f"COCO_train2014_{image_id:012d}.jpg"
            )
    questions, annotations = [], []
    for question_id, (image_id, question, answers) in VQA_QUESTIONS.items():
        questions.append(
            {"image_id": image_id, "question": question, "question_id": question_id}
        )
        annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "multiple_choice_answer": collections.Counter(answers).most_common(1)[
                    0
                ][0],
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, answer in enumerate(answers)
                ],
            }
        )
    (folder / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(
        json.dumps({"questions": questions})
    )
    (folder / "v2_mscoco_train2014_annotations.json").write_text(
        json.dumps({"annotations": annotations})
    )
    return folder


@pytest.fixture(scope="module")
def vqa_batches(vqa_source, processor):
    out = build_dataset(
        "vqa", vqa_source, vqa_source.parent / "vqa_built", answer_vocab=VQA_VOCAB
    )
    records = open_records(out, "train")
    return run(records, processor, config(global_batch_size=2))


def test_pipeline_vqa_targets_match_soft_scores(vqa_batches):
    examples = list(examples_of(vqa_batches))
    question_ids = [int(example["question_id"]) for example in examples]

    assert sorted(question_ids) == sorted(VQA_QUESTIONS)
    for example in examples:
        question_id = int(example["question_id"])
        expected = np.zeros(len(VQA_VOCAB), np.float32)
        for answer, score in VQA_SCORES[question_id].items():
            expected[VQA_VOCAB.index(answer)] = score
        np.testing.assert_allclose(
            example["vqa_targets"], expected, atol=1e-6, err_msg=str(question_id)
        )


def test_pipeline_vqa_inputs_match_question(vqa_batches, vqa_source, processor):
    for example in examples_of(vqa_batches):
        image_id, question, _ = VQA_QUESTIONS[int(example["question_id"])]
        image = vqa_source / "train2014" / f"COCO_train2014_{image_id:012d}.jpg"
        expected_ids = processor.tokenizer(
            question, padding="max_length", truncation=True, max_length=TEXT_LENGTH
        )["input_ids"]
        expected_pixels = processor.image_processor(load_image(image))["pixel_values"]

        np.testing.assert_array_equal(
            example["input_ids"], expected_ids, err_msg=question
        )
        np.testing.assert_array_equal(
            example["pixel_values"], expected_pixels[0], err_msg=question
        )


# -- invalid settings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"global_batch_size": 0}, r"global_batch_size .* got 0"),
        ({"max_text_length": 2}, r"max_text_length .* got 2"),
        ({"texts": "some"}, r"texts .* got 'some'"),
        ({"mlm_probability": 1.0}, r"mlm_probability .* got 1\.0"),
        ({"mlm_probability": -0.1}, r"mlm_probability .* got -0\.1"),
        ({"num_epochs": 0}, r"num_epochs .* got 0"),
        ({"worker_count": -1}, r"worker_count .* got -1"),
    ],
)
def test_pipeline_config_rejects_invalid_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_make_pipeline_rejects_indivisible_batch(records, processor):
    with pytest.raises(ValueError, match=r"global_batch_size 6 .* 4 data shards"):
        make_pipeline(
            records,
            processor,
            config(global_batch_size=6),
            shard_index=0,
            shard_count=4,
        )


def test_make_pipeline_rejects_invalid_shard_index(records, processor):
    with pytest.raises(ValueError, match=r"shard_index .* got 2"):
        make_pipeline(records, processor, config(), shard_index=2, shard_count=2)


@pytest.mark.parametrize(
    ("overrides", "examples"),
    [({"global_batch_size": 64}, 58), ({"global_batch_size": 16, "texts": "one"}, 15)],
)
def test_make_pipeline_rejects_oversized_batch(records, processor, overrides, examples):
    pipeline_config = config(drop_remainder=True, **overrides)
    message = rf"{examples} examples, .* {pipeline_config.global_batch_size}"

    with pytest.raises(ValueError, match=message):
        make_pipeline(records, processor, pipeline_config, shard_index=0, shard_count=1)


# -- worker processes ----------------------------------------------------------


def test_pipeline_workers_match_in_process(corrupt_records, processor, bad):
    # The corrupt dataset also checks that skip reports cross process borders.
    in_process = iter(
        make_pipeline(
            corrupt_records, processor, CORRUPT_CONFIG, shard_index=0, shard_count=1
        )
    )
    expected = take(in_process)
    pipeline = make_pipeline(
        corrupt_records,
        processor,
        dataclasses.replace(CORRUPT_CONFIG, worker_count=2),
        shard_index=0,
        shard_count=1,
    )
    uninterrupted = iter(pipeline)
    head = take(uninterrupted, 4)
    state = uninterrupted.get_state()
    rest = take(uninterrupted)
    resumed = iter(pipeline)
    resumed.set_state(state)
    tail = take(resumed)

    # The state saved with two workers also restores without workers.
    in_process_resumed = iter(
        make_pipeline(
            corrupt_records, processor, CORRUPT_CONFIG, shard_index=0, shard_count=1
        )
    )
    in_process_resumed.set_state(state)
    in_process_tail = take(in_process_resumed)
    uninterrupted.close()
    resumed.close()

    assert_batches_equal(tail, rest)
    assert_batches_equal(in_process_tail, rest)
    assert resumed.skipped_total == uninterrupted.skipped_total
    assert uninterrupted.skipped_total == len(bad)
    assert pairs_of(head + rest) == pairs_of(expected)
    assert_batches_equal(head + rest, expected)


def test_pipeline_set_state_resets_skipped_list(corrupt_records, processor, bad):
    iterator = iter(
        make_pipeline(
            corrupt_records, processor, CORRUPT_CONFIG, shard_index=0, shard_count=1
        )
    )
    start = iterator.get_state()
    take(iterator)
    iterator.set_state(start)
    take(iterator)

    assert len(iterator.skipped) == len(bad)
    assert iterator.skipped_total == len(bad)


def test_pipeline_set_state_rejects_foreign_state(records, processor):
    iterator = iter(
        make_pipeline(records, processor, config(), shard_index=0, shard_count=1)
    )

    with pytest.raises(ValueError, match="position"):
        iterator.set_state({"next_index": 3})


def test_make_pipeline_rejects_text_length_over_model_limit(records, processor):
    with pytest.raises(ValueError, match=f"limit of {processor.max_text_length}"):
        make_pipeline(
            records,
            processor,
            config(max_text_length=processor.max_text_length + 1),
            shard_index=0,
            shard_count=1,
        )


def test_make_pipeline_accepts_small_dataset_over_epochs(records, processor, all_pairs):
    batch = len(all_pairs) + 2
    pipeline = make_pipeline(
        records,
        processor,
        config(global_batch_size=batch, num_epochs=2, drop_remainder=True),
        shard_index=0,
        shard_count=1,
    )
    batches = take(iter(pipeline))

    assert len(batches) == 1
    assert len(batches[0]["input_ids"]) == batch
