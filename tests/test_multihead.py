"""BridgeTowerForPreTraining and the uni-modal encoders, against the reference.

A checkpoint that stores the MLM, ITM and ITC heads on one backbone (the layout
of bridgetower-large-itm-mlm-itc) loads into one bt-jax model whose outputs
equal each transformers head class's outputs on the same weights.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import bt_jax
from bt_jax import hub
from bt_jax.modeling import BridgeTowerForPreTraining, model_class, parse_heads
from tests.helpers import (
    make_batch,
    run_convert,
    sample_config,
    save_multihead_checkpoint,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihead")
    config = sample_config()
    models = save_multihead_checkpoint(directory, config)
    return directory, config, models


@pytest.fixture(scope="module")
def batch(checkpoint):
    _, config, _ = checkpoint
    return make_batch(config, batch=3, length=9, empty_row=False)


def torch_inputs(batch):
    return dict(
        input_ids=torch.from_numpy(batch["input_ids"]),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
        pixel_values=torch.from_numpy(
            batch["pixel_values"].transpose(0, 3, 1, 2).copy()
        ),
    )


@pytest.fixture(scope="module")
def reference(checkpoint, batch):
    _, _, models = checkpoint
    with torch.no_grad():
        return {
            "mlm": models["mlm"](**torch_inputs(batch)).logits.numpy(),
            "itm": models["itm"](**torch_inputs(batch)).logits.numpy(),
            "itc": models["itc"](**torch_inputs(batch)),
        }


@pytest.fixture(scope="module")
def loaded(checkpoint):
    directory, _, _ = checkpoint
    model, _ = bt_jax.from_pretrained(directory, head="mlm+itm+itc")
    return model


def jax_inputs(batch):
    return (
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
    )


def max_diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - np.asarray(expected)).max())


def test_stored_heads_lists_all_three(checkpoint):
    directory, _, _ = checkpoint
    assert hub.stored_heads(directory) == ("mlm", "itm", "itc")
    assert hub.checkpoint_head(directory) == "mlm+itm+itc"


def test_pretraining_outputs_match_each_head_class(loaded, batch, reference):
    output = loaded(*jax_inputs(batch))
    assert max_diff(output.mlm_logits, reference["mlm"]) < ATOL
    assert max_diff(output.itm_logits, reference["itm"]) < ATOL
    itc = reference["itc"]
    assert max_diff(output.text_embeds, itc.text_embeds.numpy()) < ATOL
    assert max_diff(output.image_embeds, itc.image_embeds.numpy()) < ATOL
    assert max_diff(output.cross_embeds, itc.cross_embeds.numpy()) < ATOL


def test_pretraining_runs_only_requested_heads(loaded, batch, reference):
    output = loaded(*jax_inputs(batch), heads="itm")
    assert output.mlm_logits is None
    assert output.text_embeds is None
    assert max_diff(output.itm_logits, reference["itm"]) < ATOL


def test_pretraining_rejects_absent_head(checkpoint, batch):
    directory, _, _ = checkpoint
    model, _ = bt_jax.from_pretrained(directory, head="itm+itc")
    with pytest.raises(ValueError, match="no mlm head"):
        model(*jax_inputs(batch), heads="mlm")


def test_encode_text_equals_reference_text_embeds(loaded, batch, reference):
    embeds = loaded.encode_text(
        jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    assert max_diff(embeds, reference["itc"].text_embeds.numpy()) < ATOL


def test_encode_image_equals_reference_image_embeds(loaded, batch, reference):
    embeds = loaded.encode_image(jnp.asarray(batch["pixel_values"]))
    assert max_diff(embeds, reference["itc"].image_embeds.numpy()) < ATOL


def test_itc_class_encoders_match_reference(checkpoint, batch, reference):
    directory, _, _ = checkpoint
    model, _ = bt_jax.from_pretrained(directory, head="itc")
    text = model.encode_text(
        jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    assert max_diff(text, reference["itc"].text_embeds.numpy()) < ATOL
    image = model.encode_image(jnp.asarray(batch["pixel_values"]))
    assert max_diff(image, reference["itc"].image_embeds.numpy()) < ATOL


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("itc+mlm", ("mlm", "itc")),
        (("itm", "itc"), ("itm", "itc")),
        ("mlm+itm+itc", ("mlm", "itm", "itc")),
    ],
)
def test_parse_heads_orders_canonically(spec, expected):
    assert parse_heads(spec) == expected


@pytest.mark.parametrize("spec", ["itm+vqa", "", "model+itm"])
def test_parse_heads_rejects_unknown(spec):
    with pytest.raises(ValueError, match="combine one or more of"):
        parse_heads(spec)


def test_model_class_builds_pretraining_for_combination():
    config = bt_jax.BridgeTowerConfig.from_dict(sample_config())
    model = bt_jax.create_model(config, "itm+mlm")
    assert isinstance(model, BridgeTowerForPreTraining)
    assert model.heads == ("mlm", "itm")
    with pytest.raises(ValueError, match="combine one or more of"):
        model_class("itm+")
    with pytest.raises(ValueError, match="joined by"):
        model_class("caption")


def test_to_jax_keeps_every_stored_head(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    out = tmp_path / "jax"
    result = run_convert("to-jax", directory, out)
    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / "bt_jax.json").read_text())
    assert metadata["head"] == "mlm+itm+itc"
    model, _ = bt_jax.from_pretrained(out)
    assert isinstance(model, BridgeTowerForPreTraining)
    assert model.heads == ("mlm", "itm", "itc")


def test_multihead_round_trip_is_bit_identical(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    assert run_convert("to-jax", directory, tmp_path / "jax").returncode == 0
    result = run_convert("to-torch", tmp_path / "jax", tmp_path / "torch")
    assert result.returncode == 0, result.stderr
    source = load_file(directory / "model.safetensors")
    exported = load_file(tmp_path / "torch" / "model.safetensors")
    assert sorted(exported) == sorted(source)
    for key, value in source.items():
        assert np.array_equal(exported[key], value), key
    config = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert config["architectures"] == ["BridgeTowerForContrastiveLearning"]


def test_conversion_copies_processor_files(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    source = tmp_path / "src"
    source.mkdir()
    for file in directory.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    (source / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 64}}')
    (source / "tokenizer.json").write_text("{}")
    assert run_convert("to-jax", source, tmp_path / "jax").returncode == 0
    assert run_convert("to-torch", tmp_path / "jax", tmp_path / "torch").returncode == 0
    for out in ("jax", "torch"):
        for name in ("preprocessor_config.json", "tokenizer.json"):
            copied = tmp_path / out / name
            assert copied.read_bytes() == (source / name).read_bytes(), copied
