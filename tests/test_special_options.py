"""Config options the reference cannot run, checked against equivalent reference models.

transformers 5.25 builds these models but raises in their forward pass (or, for
`init_layernorm_from_vision_encoder`, in the constructor). Each test builds a
reference model that computes the same function through a path the reference
can run, and compares with it.
"""

import copy

import numpy as np
import pytest
import torch
import transformers
from helpers import (
    assert_outputs_close,
    make_batch,
    run_jax,
    run_torch,
    tiny_config,
    torch_model,
)

import bt_jax

ATOL = 1e-5


@pytest.mark.parametrize("link_tower_type", ["add", "scaled_add", "interpolate"])
def test_shared_link_tower_equals_copied_towers(tmp_path, link_tower_type):
    config = tiny_config(
        share_link_tower_layers=True,
        link_tower_type=link_tower_type,
        num_hidden_layers=3,
        text_config={"num_hidden_layers": 4},
        vision_config={"num_hidden_layers": 4},
    )
    shared = torch_model(config, "itm")
    shared.save_pretrained(tmp_path / "shared")
    # Reference: per-level towers that all hold the shared tower's weights.
    unshared = torch_model({**config, "share_link_tower_layers": False}, "itm")
    state = shared.state_dict()
    for key in list(state):
        if "_link_tower." in key:
            prefix, leaf = key.split("_link_tower.")
            for level in range(config["num_hidden_layers"] - 1):
                state[f"{prefix}_link_tower.{level}.{leaf}"] = state[key]
            del state[key]
    unshared.load_state_dict(state, strict=True)
    model, _ = bt_jax.from_pretrained(tmp_path / "shared")
    batch = make_batch(config)

    assert_outputs_close(
        run_torch(unshared, "itm", batch), run_jax(model, "itm", batch), ATOL
    )


def _identity_block(block: torch.nn.Module) -> None:
    """Zero a CLIP block's output projections, so that block(x) == x exactly."""
    with torch.no_grad():
        for linear in (block.attn.out_proj, block.mlp.c_proj):
            linear.weight.zero_()
            linear.bias.zero_()


@pytest.mark.parametrize("head", ["model", "itm", "itc"])
def test_remove_last_layer_equals_shifted_blocks(tmp_path, head):
    """remove_last_layer builds L-1 vision blocks and bridges the top ones.

    Reference: a model with all L blocks whose first block is an exact identity
    and whose other blocks hold the L-1 trained blocks. It runs the same function,
    with one extra (repeated) image hidden state.
    """
    config = tiny_config(vision_config={"remove_last_layer": True})
    removed = torch_model(config, head)
    removed.save_pretrained(tmp_path / "removed")
    full_config = copy.deepcopy(config)
    full_config["vision_config"]["remove_last_layer"] = False
    reference = torch_model(full_config, head, seed=5)
    state = removed.state_dict()
    prefix = "" if head == "model" else "bridgetower."
    blocks = f"{prefix}vision_model.visual.transformer.resblocks."
    shifted = {}
    for key, value in state.items():
        if key.startswith(blocks):
            index, leaf = key[len(blocks) :].split(".", 1)
            shifted[f"{blocks}{int(index) + 1}.{leaf}"] = value
        else:
            shifted[key] = value
    for key, value in reference.state_dict().items():
        if key.startswith(f"{blocks}0."):
            shifted[key] = value
    reference.load_state_dict(shifted, strict=True)
    _identity_block(reference.get_submodule(blocks[:-1])[0])
    model, _ = bt_jax.from_pretrained(tmp_path / "removed")
    batch = make_batch(config)

    expected = run_torch(reference, head, batch)
    # Drop the identity block's output and renumber the image states.
    images = [expected.pop(f"image.{i}") for i in range(4)]
    del images[1]
    expected.update({f"image.{i}": state for i, state in enumerate(images)})
    actual = run_jax(model, head, batch)

    backbone = model if head == "model" else model.bridgetower
    assert len(backbone.vision_model.visual.transformer.resblocks) == 2
    assert_outputs_close(expected, actual, ATOL)


def test_init_layernorm_from_vision_encoder_fills_ln_separate(tmp_path):
    """A checkpoint without per-layer LayerNorms loads with them copied from ln_post."""
    base = tiny_config()
    reference = torch_model(base, "itm")
    reference.save_pretrained(tmp_path / "hf")
    config = tiny_config(
        vision_config={"share_layernorm": False},
        init_layernorm_from_vision_encoder=True,
    )
    (tmp_path / "hf" / "config.json").write_text(
        transformers.BridgeTowerConfig.from_dict(config).to_json_string()
    )

    model, _ = bt_jax.from_pretrained(tmp_path / "hf", head="itm")
    visual = model.bridgetower.vision_model.visual
    batch = make_batch(base)

    for norm in visual.ln_separate:
        np.testing.assert_array_equal(
            np.asarray(norm.scale[...]), np.asarray(visual.ln_post.scale[...])
        )
        np.testing.assert_array_equal(
            np.asarray(norm.bias[...]), np.asarray(visual.ln_post.bias[...])
        )
    # The bridges keep using ln_post, so the outputs are the reference's.
    assert_outputs_close(
        run_torch(reference, "itm", batch), run_jax(model, "itm", batch), ATOL
    )


def test_init_layernorm_from_vision_encoder_at_random_init():
    config = bt_jax.BridgeTowerConfig.from_dict(
        tiny_config(
            vision_config={"share_layernorm": False},
            init_layernorm_from_vision_encoder=True,
        )
    )
    model = bt_jax.create_model(config, "model")
    visual = model.vision_model.visual
    visual.ln_post.scale[...] = visual.ln_post.scale[...] * 3.0

    assert len(visual.ln_separate) == config.vision_config.num_hidden_layers
    # Built before ln_post changed, so they hold ln_post's initial values.
    for norm in visual.ln_separate:
        np.testing.assert_array_equal(
            np.asarray(norm.scale[...]), np.ones(64, np.float32)
        )


def test_missing_ln_separate_raises(tmp_path):
    reference = torch_model(tiny_config(), "itm")
    reference.save_pretrained(tmp_path / "hf")
    config = tiny_config(vision_config={"share_layernorm": False})
    (tmp_path / "hf" / "config.json").write_text(
        transformers.BridgeTowerConfig.from_dict(config).to_json_string()
    )

    with pytest.raises(
        bt_jax.weights.CheckpointMismatchError, match=r"ln_separate\.0\.weight"
    ):
        bt_jax.from_pretrained(tmp_path / "hf", head="itm")


def _reference_itc_embeddings(reference, batch, level):
    """ITC embeddings computed from reference modules, with image transform `level`."""
    backbone = reference.bridgetower
    with torch.no_grad():
        output = backbone(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(
                batch["pixel_values"].transpose(0, 3, 1, 2).copy()
            ),
        )
        text_states, image_states, _ = output.hidden_states
        image = backbone.vision_model.visual.forward_post(image_states[-1])
        transform = backbone.cross_modal_image_transform
        if isinstance(transform, torch.nn.ModuleList):
            transform = transform[level]
        image = transform(image) + backbone.token_type_embeddings.weight[1]
        normalize = torch.nn.functional.normalize
        return {
            "text_embeds": normalize(
                reference.itc_text_head(text_states[-1][:, 0]), dim=-1
            ).numpy(),
            "image_embeds": normalize(
                reference.itc_image_head(image[:, 0]), dim=-1
            ).numpy(),
            "cross_embeds": normalize(
                reference.itc_cross_modal_head(output.pooler_output), dim=-1
            ).numpy(),
        }


@pytest.mark.parametrize(
    "overrides",
    [
        {"share_cross_modal_transformer_layers": False},
        {"vision_config": {"hidden_size": 128}},
    ],
    ids=["unshared_transforms", "wide_vision"],
)
def test_itc_where_reference_raises(tmp_path, overrides):
    config = tiny_config(**overrides)
    reference = torch_model(config, "itc")
    reference.save_pretrained(tmp_path / "hf")
    model, _ = bt_jax.from_pretrained(tmp_path / "hf")
    batch = make_batch(config)

    expected = _reference_itc_embeddings(
        reference, batch, config["num_hidden_layers"] - 1
    )
    output = run_jax(model, "itc", batch)

    assert_outputs_close(expected, {k: output[k] for k in expected}, ATOL)
