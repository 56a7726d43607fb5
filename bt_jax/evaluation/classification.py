"""Classification accuracy for NLVR2 and SNLI-VE, with per-class counts.

The class orders follow BridgeTower's data preparation: NLVR2 label 1 means
the sentence is true of the image pair, and SNLI-VE numbers its labels
contradiction 0, neutral 1, entailment 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NLVR2_CLASSES = ("false", "true")
SNLI_VE_CLASSES = ("contradiction", "neutral", "entailment")


def classification_accuracy(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Compute the argmax accuracy of `logits` against integer `labels`.

    Args:
      logits: (examples, classes) scores. Of equal maxima the lowest class index
        is predicted.
      labels: (examples,) integer classes in [0, classes).
      class_names: a name per class for the result keys; by default the class
        indices ("0", "1", ...).

    Returns:
      `accuracy` in percent, `examples`, `correct`, and per class NAME:
      `NAME_examples` (examples labelled NAME), `NAME_predicted` (examples
      predicted as NAME) and `NAME_correct` (both).

    Raises:
      ValueError: a shape does not match, a label is outside the classes, or
        the logits contain NaN.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(
            f"logits must be a non-empty (examples, classes) array, got shape "
            f"{logits.shape}."
        )
    num_classes = logits.shape[1]
    if labels.shape != (len(logits),):
        raise ValueError(
            f"labels have shape {labels.shape} but logits have {len(logits)} "
            f"examples; give one label per example, shape ({len(logits)},)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(
            f"labels outside [0, {num_classes}) for {num_classes} classes "
            f"(first: {labels[outside][:5].tolist()}); check the label mapping."
        )
    if np.isnan(logits).any():
        rows = np.flatnonzero(np.isnan(logits).any(axis=1))
        raise ValueError(
            f"logits of {len(rows)} examples contain NaN (first rows: "
            f"{rows[:5].tolist()}); check the model's inputs."
        )
    if class_names is None:
        class_names = [str(index) for index in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"logits have {num_classes} classes but class_names has "
            f"{len(class_names)} ({list(class_names)}); give one name per class."
        )

    predictions = np.argmax(logits, axis=1)
    correct = predictions == labels
    result: dict[str, float] = {
        "accuracy": 100.0 * float(np.mean(correct)),
        "examples": len(labels),
        "correct": int(correct.sum()),
    }
    for index, name in enumerate(class_names):
        result[f"{name}_examples"] = int((labels == index).sum())
        result[f"{name}_predicted"] = int((predictions == index).sum())
        result[f"{name}_correct"] = int((correct & (labels == index)).sum())
    return result


def nlvr2_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute NLVR2 accuracy from (examples, 2) logits; label 1 means true."""
    return classification_accuracy(logits, labels, NLVR2_CLASSES)


def snli_ve_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute SNLI-VE accuracy from (examples, 3) logits.

    The labels are contradiction 0, neutral 1 and entailment 2.
    """
    return classification_accuracy(logits, labels, SNLI_VE_CLASSES)
