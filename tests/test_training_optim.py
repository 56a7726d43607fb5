"""Optimizer groups, weight-decay rule and schedule; objective settings and
negative sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.training.objectives import ObjectiveConfig, sample_negatives
from bt_jax.training.optim import (
    OptimizerConfig,
    applies_weight_decay,
    learning_rate_schedule,
    parameter_group,
)


@pytest.mark.parametrize(
    ("key", "decay"),
    [
        ("bridgetower.text_model.encoder.layer.0.attention.self.query.weight", True),
        ("bridgetower.text_model.encoder.layer.0.attention.self.query.bias", False),
        ("bridgetower.text_model.embeddings.LayerNorm.weight", False),
        ("bridgetower.vision_model.visual.ln_post.weight", True),
        ("bridgetower.vision_model.visual.ln_post.bias", False),
        ("bridgetower.vision_model.visual.transformer.resblocks.0.ln_1.weight", True),
        ("bridgetower.cross_modal_text_layernorm.weight", False),
        ("bridgetower.cross_modal_image_link_tower.0.LayerNorm.weight", False),
        ("bridgetower.token_type_embeddings.weight", True),
        ("logit_scale", True),
    ],
)
def test_weight_decay_follows_reference_names(key, decay):
    assert applies_weight_decay(key) is decay


@pytest.mark.parametrize(
    ("key", "group"),
    [
        (
            "bridgetower.cross_modal_text_layers.0.attention.self.query.weight",
            "cross_modal",
        ),
        ("bridgetower.cross_modal_image_transform.weight", "cross_modal"),
        ("bridgetower.text_model.encoder.layer.0.output.dense.weight", "base"),
        ("bridgetower.token_type_embeddings.weight", "base"),
        ("logit_scale", "base"),
        ("mlm_score.decoder.weight", "head"),
        ("itm_score.fc.weight", "head"),
        ("itc_cross_modal_head.fc.bias", "head"),
    ],
)
def test_parameter_group_by_name(key, group):
    assert parameter_group(key) == group


def test_schedule_warmup_then_linear_decay():
    config = OptimizerConfig(
        learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=10, total_steps=110
    )
    schedule = learning_rate_schedule(config)

    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    # Halfway through the 100 decay steps: (1e-3 + 1e-4) / 2.
    assert float(schedule(60)) == pytest.approx(5.5e-4)
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_schedule_fractional_warmup_and_multiplier():
    config = OptimizerConfig(learning_rate=2e-5, warmup_steps=0.1, total_steps=1000)
    schedule = learning_rate_schedule(config, multiplier=5.0)

    assert config.warmup == 100
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert float(schedule(50)) == pytest.approx(5e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"total_steps": 0},
        {"warmup_steps": 200, "total_steps": 100},
        {"learning_rate": 0},
    ],
)
def test_optimizer_config_rejects_invalid(overrides):
    with pytest.raises(ValueError):
        OptimizerConfig(**overrides)


def test_objective_heads_follow_weights():
    assert ObjectiveConfig().heads == ("mlm", "itm", "itc")
    assert ObjectiveConfig(itc_weight=0, itm_negatives="random").heads == ("mlm", "itm")
    # Hard negatives need the contrastive similarity even without an ITC loss.
    assert ObjectiveConfig(itc_weight=0).heads == ("mlm", "itm", "itc")


@pytest.mark.parametrize(
    "overrides",
    [
        {"itm_negatives": "easy"},
        {"mlm_weight": -1.0},
        {"mlm_weight": 0.0, "itm_weight": 0.0, "itc_weight": 0.0},
    ],
)
def test_objective_config_rejects_invalid(overrides):
    with pytest.raises(ValueError):
        ObjectiveConfig(**overrides)


@pytest.mark.parametrize("mode", ["hard", "random"])
def test_sample_negatives_never_pick_positive(mode):
    similarity = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
    for seed in range(20):
        images, texts = sample_negatives(similarity, jax.random.key(seed), mode)
        assert not np.any(np.asarray(images) == np.arange(6))
        assert not np.any(np.asarray(texts) == np.arange(6))


def test_sample_negatives_hard_follows_similarity():
    # Text 0 is far more similar to image 2 than to the others.
    similarity = jnp.zeros((4, 4)).at[0, 2].set(20.0)
    picks = [
        int(sample_negatives(similarity, jax.random.key(seed), "hard")[0][0])
        for seed in range(20)
    ]
    assert picks.count(2) == 20
