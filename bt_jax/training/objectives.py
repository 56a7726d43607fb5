"""Pretraining objectives: masked language modelling, image-text matching and
image-text contrastive learning, as one pure loss function.

ITM compares each positive pair with negatives built from the same batch:
text i with image j(i) and text k(i) with image i. "hard" negatives sample
j(i) and k(i) from the softmax of the contrastive similarity with the positive
masked out, as in ALBEF and BridgeTower's retrieval fine-tuning. "random"
negatives pick any other member of the batch, like the random false image of
the original pretraining.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from bt_jax import losses, sharding
from bt_jax.modeling.bridgetower import ACTIVATION_AXES

# Hidden states of every layer, stacked: (layers, batch, length, width).
STACKED_AXES = (None, *ACTIVATION_AXES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """Loss weights and the ITM negative sampling.

    A weight of 0 removes its objective (and its forward pass).
    """

    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    itc_weight: float = 1.0
    itm_negatives: Literal["hard", "random"] = "hard"
    # True runs the step as one batch. The vision encoder runs once on the
    # images, and the text encoder on the MLM and plain texts, then on the
    # negatives' texts. The cross-modal tower then runs once on the MLM,
    # positive and negative pairs together. False runs the three passes
    # separately, each with its own vision encoding, as the original PyTorch
    # recipe does. The vision
    # encoder has no dropout and every pair keeps its own text dropout, so
    # both compute the same function: the same losses and gradients without
    # dropout, and the same in distribution with it (the masks are drawn from
    # other keys). Fusing does a quarter of the vision work.
    fuse_passes: bool = True

    def __post_init__(self):
        if self.itm_negatives not in ("hard", "random"):
            raise ValueError(
                f'itm_negatives must be "hard" or "random", got {self.itm_negatives!r}.'
            )
        weights = (self.mlm_weight, self.itm_weight, self.itc_weight)
        if min(weights) < 0 or not any(weights):
            raise ValueError(
                f"loss weights must be >= 0 with at least one positive, got mlm "
                f"{self.mlm_weight}, itm {self.itm_weight}, itc {self.itc_weight}."
            )

    @property
    def heads(self) -> tuple[str, ...]:
        """The model heads these objectives need."""
        names = (("mlm", self.mlm_weight), ("itm", self.itm_weight))
        heads = [name for name, weight in names if weight]
        if self.itc_weight or (self.itm_weight and self.itm_negatives == "hard"):
            heads.append("itc")
        return tuple(heads)


def sample_negatives(
    similarity: jax.Array,
    rng: jax.Array,
    mode: str,
    groups: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draw a negative image for each text and a negative text for each image.

    Args:
      similarity: (B, B) text-to-image scores; row i is text i.
      rng: random key.
      mode: "hard" samples in proportion to softmax(similarity) among the
        allowed members; "random" samples uniformly among them.
      groups: optional (B,) ids, such as the record each pair comes from. Members
        sharing a row's id are not allowed as its negative (the same image with
        another caption is no negative). A row whose id every member shares
        falls back to excluding only itself.

    Returns:
      `(image_for_text, text_for_image)`, each (B,) int32, never equal to the
      row's own index when B > 1.
    """
    size = similarity.shape[0]
    text_rng, image_rng = jax.random.split(rng)
    own = jnp.eye(size, dtype=bool)
    excluded = own if groups is None else groups[:, None] == groups[None, :]
    excluded = jnp.where(jnp.all(excluded, axis=-1, keepdims=True), own, excluded)
    if mode == "random":
        scores = jnp.zeros((size, size), jnp.float32)
    else:
        scores = jax.lax.stop_gradient(similarity).astype(jnp.float32)
    masked = jnp.where(excluded, -jnp.inf, scores)
    image_for_text = jax.random.categorical(text_rng, masked, axis=-1)
    text_for_image = jax.random.categorical(image_rng, masked.T, axis=-1)
    return image_for_text.astype(jnp.int32), text_for_image.astype(jnp.int32)


def pretraining_loss(
    model, batch: dict[str, jax.Array], rng: jax.Array, config: ObjectiveConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Return the weighted sum of the objectives and per-objective metrics.

    Args:
      model: a `BridgeTowerForPreTraining` with the heads `config.heads`.
      batch: `pixel_values`, `input_ids`, `attention_mask`, and for MLM
        `mlm_input_ids` and `mlm_labels` (as `bt_jax.data` produces them).
        With `record_index`, ITM never uses a pair's own image (paired with
        another of its captions) as its negative.
      rng: key for dropout and negative sampling.
      config: weights and negative sampling.
    """
    if config.fuse_passes:
        return _fused_loss(model, batch, rng, config)
    negative_rng, dropout_rng = jax.random.split(rng)
    dropout = jax.random.split(dropout_rng, 3)
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch["pixel_values"]

    if config.mlm_weight:
        output = model(
            batch["mlm_input_ids"], mask, pixels, heads="mlm", dropout_rng=dropout[0]
        )
        mlm, mlm_metrics = _mlm_objective(output.mlm_logits, batch["mlm_labels"])
        metrics.update(mlm_metrics)
        total = total + config.mlm_weight * mlm

    needs_itc = "itc" in config.heads
    if config.itm_weight or needs_itc:
        heads = [head for head in ("itm", "itc") if head in config.heads]
        positive = model(ids, mask, pixels, heads=heads, dropout_rng=dropout[1])
        similarity = None
        if needs_itc:
            similarity = _similarity(model, positive.text_embeds, positive.image_embeds)
        if config.itc_weight:
            itc = losses.contrastive_loss(
                positive.text_embeds,
                positive.image_embeds,
                positive.cross_embeds,
                model.logit_scale[...],
            )
            metrics["itc_loss"] = itc
            total = total + config.itc_weight * itc
        if config.itm_weight:
            itm_loss, itm_metrics = _itm_loss(
                model,
                batch,
                positive.itm_logits,
                similarity,
                negative_rng,
                dropout[2],
                config,
            )
            metrics.update(itm_metrics)
            total = total + config.itm_weight * itm_loss

    metrics["loss"] = total
    return total, metrics


def _fused_loss(model, batch, rng, config: ObjectiveConfig):
    """`pretraining_loss` as one batch; see `ObjectiveConfig.fuse_passes`."""
    negative_rng, dropout_rng = jax.random.split(rng)
    text_rng, negative_text_rng, cross_rng = jax.random.split(dropout_rng, 3)
    backbone = model.bridgetower
    ids, mask = batch["input_ids"], batch["attention_mask"]
    size = ids.shape[0]
    needs_itc = "itc" in config.heads
    needs_pairs = bool(config.itm_weight) or needs_itc
    images = backbone.image_hidden_states(batch["pixel_values"])
    # The bridges' image transforms depend on the image alone, so they run once
    # per image and each pair indexes its image's rows.
    bridge_inputs = backbone.image_bridge_inputs(images)

    # Rows of the cross-modal batch: [MLM texts, plain texts, negatives], each
    # part present only if an objective needs it.
    texts = []
    if config.mlm_weight:
        texts.append(batch["mlm_input_ids"])
    if needs_pairs:
        texts.append(ids)
    text_states = backbone.text_hidden_states(
        jnp.concatenate(texts),
        jnp.concatenate([mask] * len(texts)),
        dropout_rng=text_rng,
    )
    parts = [(text, mask, bridge_inputs) for text in texts]
    metrics = {}
    total = jnp.zeros((), jnp.float32)

    similarity = None
    if needs_itc:
        plain = text_states[:, -size:]
        text_embeds = model._text_embeds(plain[-1])
        image_embeds = model._image_embeds(images[-1])
        similarity = _similarity(model, text_embeds, image_embeds)
    if config.itm_weight:
        negative_ids, negative_mask, order = _negative_pairs(
            batch, similarity, negative_rng, config
        )
        # Each negative text gets dropout of its own.
        negative_states = backbone.text_hidden_states(
            negative_ids, negative_mask, dropout_rng=negative_text_rng
        )
        text_states = jnp.concatenate([text_states, negative_states], axis=1)
        parts.append((negative_ids, negative_mask, bridge_inputs[:, order]))

    # NOTE: on a 2-core CPU this fused step reached 59% of the float32 matmul
    # peak, against 67% for separate passes (bench/RESULTS.md), yet ran faster.
    # Fusing removes vision encoder matmuls, which XLA runs at a higher share of
    # peak than the cross-modal tower's backward pass (`python -m bench.step_parts`).
    image_inputs = jnp.concatenate([part[2] for part in parts], axis=1)
    trace = backbone.forward_trace(
        jnp.concatenate([part[0] for part in parts]),
        jnp.concatenate([part[1] for part in parts]),
        None,
        dropout_rng=cross_rng,
        text_hidden_states=sharding.constrain(text_states, STACKED_AXES),
        image_bridge_inputs=sharding.constrain(image_inputs, STACKED_AXES),
        full_image_features=False,
    )

    start = 0
    if config.mlm_weight:
        logits = model._mlm_logits(trace.text_features[:size])
        mlm, mlm_metrics = _mlm_objective(logits, batch["mlm_labels"])
        metrics.update(mlm_metrics)
        total = total + config.mlm_weight * mlm
        start = size
    if config.itc_weight:
        pooled = trace.pooler_output[start : start + size]
        cross_embeds = losses.l2_normalize(model.itc_cross_modal_head(pooled))
        itc = losses.contrastive_loss(
            text_embeds, image_embeds, cross_embeds, model.logit_scale[...]
        )
        metrics["itc_loss"] = itc
        total = total + config.itc_weight * itc
    if config.itm_weight:
        logits = model.itm_score(trace.pooler_output[start:])
        itm, itm_metrics = _itm_objective(logits, size)
        metrics.update(itm_metrics)
        total = total + config.itm_weight * itm

    metrics["loss"] = total
    return total, metrics


def _similarity(model, text_embeds: jax.Array, image_embeds: jax.Array) -> jax.Array:
    """Return the (texts, images) ITC similarity, scaled by exp(logit_scale)."""
    scale = jnp.exp(model.logit_scale[...].astype(jnp.float32))
    return (
        jnp.matmul(text_embeds, image_embeds.T, preferred_element_type=jnp.float32)
        * scale
    )


def _mlm_objective(logits: jax.Array, labels: jax.Array):
    loss = _masked_lm_loss(logits, labels)
    predicted = jnp.argmax(logits, axis=-1)
    selected = labels != losses.IGNORE_INDEX
    accuracy = jnp.sum((predicted == labels) & selected) / jnp.maximum(
        jnp.sum(selected), 1
    )
    return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}


def _itm_objective(logits: jax.Array, size: int):
    """Cross-entropy of `size` positive logits followed by `2 * size` negative ones."""
    labels = jnp.concatenate(
        [jnp.ones((size,), jnp.int32), jnp.zeros((2 * size,), jnp.int32)]
    )
    loss = losses.cross_entropy(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, {"itm_loss": loss, "itm_accuracy": accuracy}


def _masked_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # Unlike losses.masked_lm_loss, a batch where no token was selected gives
    # 0 instead of NaN, so a rare empty draw does not stop training.
    selected = labels != losses.IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(selected, labels, 0)
    picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(selected, picked, 0.0)) / jnp.maximum(
        jnp.sum(selected), 1
    )


def _negative_pairs(batch, similarity, rng, config):
    """Draw the ITM negatives: their texts, masks and the index of each one's image.

    Texts 0..B-1 go with images image_for_text, then texts text_for_image with
    images 0..B-1.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    size = ids.shape[0]
    if similarity is None:
        similarity = jnp.zeros((size, size), jnp.float32)
    image_for_text, text_for_image = sample_negatives(
        similarity, rng, config.itm_negatives, batch.get("record_index")
    )
    return (
        jnp.concatenate([ids, ids[text_for_image]]),
        jnp.concatenate([mask, mask[text_for_image]]),
        jnp.concatenate([image_for_text, jnp.arange(size)]),
    )


def _itm_loss(model, batch, positive_logits, similarity, rng, dropout_rng, config):
    negative_ids, negative_mask, order = _negative_pairs(batch, similarity, rng, config)
    negative = model(
        negative_ids,
        negative_mask,
        batch["pixel_values"][order],
        heads="itm",
        dropout_rng=dropout_rng,
    )
    logits = jnp.concatenate([positive_logits, negative.itm_logits])
    return _itm_objective(logits, batch["input_ids"].shape[0])
