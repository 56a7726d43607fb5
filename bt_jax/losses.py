"""Pure loss functions, written to match PyTorch's `cross_entropy` conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divide by the L2 norm of the last axis, clamped below at `eps` (torch's F.normalize)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean softmax cross-entropy over the labels that are not `ignore_index`.

    `labels` may carry a trailing axis of size 1. When every label is ignored the
    result is NaN, as in PyTorch. A label outside `[0, classes)` raises ValueError
    for concrete arrays; inside `jax.jit`, where values cannot be checked, it makes
    the loss NaN rather than wrapping around.
    """
    classes = logits.shape[-1]
    logits = logits.reshape(-1, classes).astype(jnp.float32)
    labels = labels.reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels contain {labels.shape[0]} entries but logits have {logits.shape[0]} "
            "rows; pass one label per position."
        )
    if not isinstance(labels, jax.core.Tracer):
        # NumPy, because jnp operations would be traced when this runs under jit.
        values = np.asarray(labels)
        bad = values[(values != ignore_index) & ((values < 0) | (values >= classes))]
        if bad.size:
            raise ValueError(
                f"label {int(bad[0])} is outside the {classes} classes [0, {classes}); "
                f"use {ignore_index} for positions without a loss."
            )
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < classes)
    safe_labels = jnp.where(valid & in_range, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    loss = -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)
    return jnp.where(jnp.any(valid & ~in_range), jnp.nan, loss)


def masked_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy over masked positions; `labels` is -100 where no loss is taken."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"MLM labels have shape {tuple(labels.shape)} but the logits cover "
            f"{tuple(logits.shape[:-1])}; give one label per token (-100 to skip it)."
        )
    return cross_entropy(logits, labels)


def contrastive_loss(
    text_embeds: jax.Array,
    image_embeds: jax.Array,
    cross_embeds: jax.Array,
    logit_scale: jax.Array,
) -> jax.Array:
    """Return the ITC loss of transformers' `BridgeTowerForContrastiveLearning`.

    Pair i is the positive of row i in three similarity matrices (text-image,
    text-cross, image-cross), each scaled by exp(logit_scale). The loss is the mean
    of the three row-wise cross-entropies; there is no column (transposed) term.
    """
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    labels = jnp.arange(text_embeds.shape[0])
    total = 0.0
    for left, right in (
        (text_embeds, image_embeds),
        (text_embeds, cross_embeds),
        (image_embeds, cross_embeds),
    ):
        similarity = (
            jnp.matmul(left, right.T, preferred_element_type=jnp.float32) * scale
        )
        total = total + cross_entropy(similarity, labels)
    return total / 3.0


def vqa_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy against VQA soft scores, summed over answers.

    The reference takes the mean of the element-wise binary cross-entropy with
    logits and multiplies it by the number of answers, which equals the sum
    over answers averaged over questions.

    Args:
      logits: `(batch, answers)` scores of the VQA head.
      targets: `(batch, answers)` soft scores in [0, 1]
        (`bt_jax.data.vqa.dense_targets`).
    """
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"VQA targets have shape {tuple(targets.shape)} but the logits have "
            f"{tuple(logits.shape)}; the answer vocabulary of the data must be the "
            "head's (config.id2label)."
        )
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    # log(1 + exp(-|x|)) keeps large logits finite, as torch's version does.
    elementwise = (
        jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    )
    return jnp.sum(elementwise, axis=-1).mean()
