"""Metrics for BridgeTower's fine-tuning tasks, and a result writer.

The functions take NumPy arrays and plain Python values, not models: the
caller runs the model and passes predictions, logits or scores. Accuracies
and recalls are in percent, as BridgeTower reports them. Pretraining
evaluation, whose recalls are fractions, lives in `bt_jax.training.evaluation`.

`EVALUATORS` maps each task name to its metric function:

- "vqa": `vqa_accuracy(predictions, annotations, answer_types=None)`, with
  `logits_to_answers` to decode the classifier's logits;
- "retrieval": `retrieval_recall(t2i_scores, i2t_scores, text_to_image)`, with
  `rerank_scores` for the ITC top-k, ITM re-ranked score matrices;
- "nlvr2": `nlvr2_accuracy(logits, labels)`;
- "snli-ve": `snli_ve_accuracy(logits, labels)`.

Each returns a flat dict of metric name to number, which `write_results`
saves as JSON and as a text table.
"""

from __future__ import annotations

from collections.abc import Callable

from bt_jax.evaluation.classification import (
    NLVR2_CLASSES,
    SNLI_VE_CLASSES,
    classification_accuracy,
    nlvr2_accuracy,
    snli_ve_accuracy,
)
from bt_jax.evaluation.results import format_table, write_results
from bt_jax.evaluation.retrieval import (
    first_relevant_rank,
    rerank_scores,
    retrieval_recall,
    top_k_candidates,
)
from bt_jax.evaluation.vqa import logits_to_answers, vqa_accuracy, vqa_score

EVALUATORS: dict[str, Callable[..., dict[str, float]]] = {
    "vqa": vqa_accuracy,
    "retrieval": retrieval_recall,
    "nlvr2": nlvr2_accuracy,
    "snli-ve": snli_ve_accuracy,
}


def get_evaluator(task: str) -> Callable[..., dict[str, float]]:
    """Look up the metric function of a fine-tuning task in `EVALUATORS`."""
    try:
        return EVALUATORS[task]
    except KeyError:
        raise ValueError(
            f"unknown evaluation task {task!r}; choose one of {sorted(EVALUATORS)}."
        ) from None


__all__ = [
    "EVALUATORS",
    "NLVR2_CLASSES",
    "SNLI_VE_CLASSES",
    "classification_accuracy",
    "first_relevant_rank",
    "format_table",
    "get_evaluator",
    "logits_to_answers",
    "nlvr2_accuracy",
    "rerank_scores",
    "retrieval_recall",
    "snli_ve_accuracy",
    "top_k_candidates",
    "vqa_accuracy",
    "vqa_score",
    "write_results",
]
