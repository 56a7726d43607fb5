"""Field detection and record layout for TFDS datasets bt-jax did not build.

TFDS's `coco_captions` needs TensorFlow and a download to prepare. So these
tests give `Records` a source whose examples have the layout that TFDS's numpy
decoding returns for that dataset's features: a `Sequence` of a dict comes back
as a dict of arrays, and text as bytes.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bt_jax.data.reading import (
    BT_JAX_FIELDS,
    COCO_CAPTIONS_FIELDS,
    Fields,
    Records,
    detect_fields,
)

COCO_CAPTIONS_FEATURES = tfds.features.FeaturesDict(
    {
        "image": tfds.features.Image(),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
    }
)


def _coco_example(image_id: int, captions: list[tuple[int, str]]) -> dict:
    return {
        "image": b"\xff\xd8 encoded bytes",
        "image/filename": f"COCO_val2014_{image_id:012d}.jpg".encode(),
        "image/id": np.int64(image_id),
        "captions": {
            "id": np.asarray([caption_id for caption_id, _ in captions], np.int64),
            "text": np.asarray([text.encode() for _, text in captions], object),
        },
    }


def test_detect_fields_coco_captions_layout():
    fields = detect_fields(COCO_CAPTIONS_FEATURES)

    assert fields == COCO_CAPTIONS_FIELDS


def test_detect_fields_bt_jax_layout():
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(),
            "image/id": tfds.features.Text(),
            "texts": tfds.features.Sequence(tfds.features.Text()),
            "text_ids": tfds.features.Sequence(tfds.features.Text()),
        }
    )

    assert detect_fields(features) == BT_JAX_FIELDS


def test_detect_fields_unknown_layout_names_features():
    features = tfds.features.FeaturesDict(
        {"photo": tfds.features.Image(), "label": np.int64}
    )

    with pytest.raises(ValueError, match=r"'label', 'photo'") as raised:
        detect_fields(features)
    assert "Fields(" in str(raised.value)


def test_records_read_coco_captions_examples():
    examples = [
        _coco_example(42, [(7, "A dog on a sofa."), (9, "A brown dog.")]),
        _coco_example(43, [(11, "Two cats.")]),
    ]
    records = Records([examples], COCO_CAPTIONS_FIELDS, None, {}, "val")

    first = records[0]
    assert first["id"] == "42"
    assert first["texts"] == ["A dog on a sofa.", "A brown dog."]
    assert first["text_ids"] == ["7", "9"]
    assert first["image"] == b"\xff\xd8 encoded bytes"
    assert records[1]["texts"] == ["Two cats."]
    assert records.texts_per_record(progress=False) == [2, 1]


def test_records_concatenate_sources_in_order():
    first_split = [_coco_example(1, [(1, "one")])]
    second_split = [_coco_example(2, [(2, "two")]), _coco_example(3, [(3, "three")])]
    records = Records(
        [first_split, second_split], COCO_CAPTIONS_FIELDS, None, {}, "a+b"
    )

    assert len(records) == 3
    assert [records[i]["id"] for i in range(3)] == ["1", "2", "3"]
    with pytest.raises(IndexError):
        records[3]


def test_records_single_text_field_without_ids():
    examples = [{"img": b"bytes", "caption": b"A single caption."}]
    fields = Fields(image="img", texts="caption", text_ids=None, id="")
    records = Records([examples], fields, None, {}, "train")

    record = records[0]
    assert record["texts"] == ["A single caption."]
    assert record["text_ids"] == ["0/0"]
    assert record["id"] == "0"
