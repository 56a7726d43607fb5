"""Output and layer-by-layer parity with the transformers reference on tiny configs."""

import numpy as np
import pytest
from helpers import (
    assert_outputs_close,
    make_batch,
    run_jax,
    run_torch,
    save_torch_model,
    tiny_config,
    torch_model,
)

import bt_jax

ATOL = 1e-5
HEADS = ("model", "mlm", "itm", "itc")

# Each variant changes one architectural choice of the tiny preset.
VARIANTS = {
    "add": {},
    "scaled_add": {"link_tower_type": "scaled_add"},
    "interpolate": {"link_tower_type": "interpolate"},
    "unshared_transforms": {"share_cross_modal_transformer_layers": False},
    "patch14": {"vision_config": {"patch_size": 14, "image_size": 28}},
    "patch_not_dividing": {"vision_config": {"patch_size": 16, "image_size": 40}},
    "three_cross_layers": {
        "num_hidden_layers": 3,
        "text_config": {"num_hidden_layers": 4},
        "vision_config": {"num_hidden_layers": 4},
    },
    "one_cross_layer": {"num_hidden_layers": 1},
    "wide_vision": {"vision_config": {"hidden_size": 128}},
    "share_layernorm_false": {"vision_config": {"share_layernorm": False}},
    "tied_word_embeddings": {"tie_word_embeddings": True},
}


def load_pair(tmp_path, config, head, **save_kwargs):
    reference = torch_model(config, head)
    save_torch_model(reference, tmp_path / "hf", **save_kwargs)
    model, _ = bt_jax.from_pretrained(tmp_path / "hf")
    return reference, model


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_tiny_variant(tmp_path, variant, head):
    config = tiny_config(**VARIANTS[variant])
    if head == "itc" and variant in ("unshared_transforms", "wide_vision"):
        pytest.skip(
            "the reference ITC head raises here; test_special_options covers it"
        )
    reference, model = load_pair(tmp_path, config, head)
    batch = make_batch(config, batch=4, length=11)

    assert_outputs_close(
        run_torch(reference, head, batch), run_jax(model, head, batch), ATOL
    )


@pytest.mark.parametrize("head", HEADS)
def test_parity_interpolate_pos_encoding(tmp_path, head):
    config = tiny_config(vision_config={"image_size": 48})
    reference, model = load_pair(tmp_path, config, head)
    for size in (64, 32, 48):  # upsampled, downsampled, and unchanged grid
        batch = make_batch(config, image_size=size, seed=size)
        expected = run_torch(reference, head, batch, interpolate_pos_encoding=True)
        actual = run_jax(model, head, batch, interpolate_pos_encoding=True)
        assert_outputs_close(expected, actual, ATOL)


def test_parity_interpolate_non_square(tmp_path):
    config = tiny_config(vision_config={"image_size": 48})
    reference, model = load_pair(tmp_path, config, "itm")
    batch = make_batch(config)
    batch["pixel_values"] = np.random.default_rng(1).standard_normal(
        (3, 32, 80, 3), np.float32
    )

    expected = run_torch(reference, "itm", batch, interpolate_pos_encoding=True)
    actual = run_jax(model, "itm", batch, interpolate_pos_encoding=True)

    assert_outputs_close(expected, actual, ATOL)


def test_parity_empty_attention_row_is_finite(tmp_path):
    config = tiny_config()
    reference, model = load_pair(tmp_path, config, "itm")
    batch = make_batch(config, empty_row=True)
    batch["attention_mask"][:] = 0  # every row fully masked

    actual = run_jax(model, "itm", batch)

    assert all(np.isfinite(v).all() for v in actual.values())
    assert_outputs_close(run_torch(reference, "itm", batch), actual, ATOL)


def test_parity_batch_of_one_without_mask(tmp_path):
    config = tiny_config()
    reference, model = load_pair(tmp_path, config, "mlm")
    batch = make_batch(config, batch=1, empty_row=False)
    batch["attention_mask"][:] = 1

    assert_outputs_close(
        run_torch(reference, "mlm", batch), run_jax(model, "mlm", batch), ATOL
    )


@pytest.mark.parametrize(
    "variant", ["add", "unshared_transforms", "three_cross_layers"]
)
def test_parity_scanned_layers(tmp_path, variant):
    # Inference unrolls the layer stacks by default; the `lax.scan` path that
    # `scan_layers = True` selects (and training uses) must match the reference.
    config = tiny_config(**VARIANTS[variant])
    reference, model = load_pair(tmp_path, config, "itm")
    model.bridgetower.scan_layers = True
    batch = make_batch(config, batch=3, length=9)
    assert_outputs_close(
        run_torch(reference, "itm", batch), run_jax(model, "itm", batch), ATOL
    )


@pytest.mark.parametrize("head", ["itm", "itc"])
@pytest.mark.parametrize(
    "variant,scan",
    [("add", False), ("one_cross_layer", False), ("three_cross_layers", True)],
)
def test_parity_heads_without_hidden_states(tmp_path, variant, scan, head):
    # Without hidden states the heads compute only the class token of the last
    # image cross-modal layer, in a `lax.cond` branch when the levels are scanned.
    config = tiny_config(**VARIANTS[variant])
    reference, model = load_pair(tmp_path, config, head)
    model.bridgetower.scan_layers = scan
    batch = make_batch(config, batch=3, length=9)
    expected = run_torch(reference, head, batch)
    actual = run_jax(model, head, batch, output_hidden_states=False)
    assert_outputs_close({name: expected[name] for name in actual}, actual, ATOL)
