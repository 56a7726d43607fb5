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

from bt_jax import losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """Loss weights and the ITM negative sampling.

    A weight of 0 removes its objective (and its forward pass).
    """

    mlm_weight: float = 1.0
    itm_weight: float = 1.0
    itc_weight: float = 1.0
    itm_negatives: Literal["hard", "random"] = "hard"

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
    negative_rng, dropout_rng = jax.random.split(rng)
    dropout = jax.random.split(dropout_rng, 3)
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    pixels = batch["pixel_values"]
    ids, mask = batch["input_ids"], batch["attention_mask"]

    if config.mlm_weight:
        output = model(
            batch["mlm_input_ids"], mask, pixels, heads="mlm", dropout_rng=dropout[0]
        )
        labels = batch["mlm_labels"]
        mlm = _masked_lm_loss(output.mlm_logits, labels)
        predicted = jnp.argmax(output.mlm_logits, axis=-1)
        selected = labels != losses.IGNORE_INDEX
        metrics["mlm_loss"] = mlm
        metrics["mlm_accuracy"] = jnp.sum(
            (predicted == labels) & selected
        ) / jnp.maximum(jnp.sum(selected), 1)
        total = total + config.mlm_weight * mlm

    needs_itc = "itc" in config.heads
    if config.itm_weight or needs_itc:
        heads = [head for head in ("itm", "itc") if head in config.heads]
        positive = model(ids, mask, pixels, heads=heads, dropout_rng=dropout[1])
        similarity = None
        if needs_itc:
            scale = jnp.exp(model.logit_scale[...].astype(jnp.float32))
            similarity = (
                jnp.matmul(
                    positive.text_embeds,
                    positive.image_embeds.T,
                    preferred_element_type=jnp.float32,
                )
                * scale
            )
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


def _itm_loss(model, batch, positive_logits, similarity, rng, dropout_rng, config):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch["pixel_values"]
    size = ids.shape[0]
    if similarity is None:
        similarity = jnp.zeros((size, size), jnp.float32)
    image_for_text, text_for_image = sample_negatives(
        similarity, rng, config.itm_negatives, batch.get("record_index")
    )
    negative_ids = jnp.concatenate([ids, ids[text_for_image]])
    negative_mask = jnp.concatenate([mask, mask[text_for_image]])
    negative_pixels = jnp.concatenate([pixels[image_for_text], pixels])
    negative = model(
        negative_ids,
        negative_mask,
        negative_pixels,
        heads="itm",
        dropout_rng=dropout_rng,
    )
    logits = jnp.concatenate([positive_logits, negative.itm_logits])
    labels = jnp.concatenate(
        [jnp.ones((size,), jnp.int32), jnp.zeros((2 * size,), jnp.int32)]
    )
    loss = losses.cross_entropy(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, {"itm_loss": loss, "itm_accuracy": accuracy}
