"""VQA v2 accuracy: per-question scores, dataset accuracy and answer decoding.

A predicted answer is compared with the 10 human answers of its question after
both are normalised by `bt_jax.data.vqa.normalize_answer`. Two scores exist:

- the simple score: min(matches / 3, 1), where `matches` counts the human
  answers equal to the prediction;
- the official score (`vqaEval.py` of the VQA API): the mean of min(matches / 3, 1)
  over the 10 subsets that leave one human answer out. With 10 answers it
  equals min(0.3 * matches, 1): 1 match gives 0.3 instead of 1/3, 2 give 0.6
  instead of 2/3, 3 give 0.9 instead of 1, and 4 or more give 1 in both.

Both the scores and `vqa_accuracy` use the official score unless called with
`leave_one_out=False`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from bt_jax.data.vqa import normalize_answer

logger = logging.getLogger(__name__)

# Human answers repeat a lot across questions ("yes", "2", "white"), so a cache
# saves most of the normalisation work on the 214k validation questions.
_normalize = functools.lru_cache(maxsize=1 << 16)(normalize_answer)


def vqa_score(
    prediction: str, answers: Sequence[str], *, leave_one_out: bool = True
) -> float:
    """Score one predicted answer against the human answers of its question.

    Args:
      prediction: the predicted answer, normalised or not.
      answers: the human answers (10 in VQA v2), normalised or not.
      leave_one_out: True for the official score, the mean of min(matches / 3, 1)
        over the subsets that leave one human answer out; False for
        min(matches / 3, 1) over all answers.

    Returns:
      The score in [0, 1].

    NOTE: both the prediction and every human answer are fully normalised. The
    official script normalises the prediction the same way but applies only the
    punctuation step to human answers, and only when they disagree. So a human
    answer such as "two" matches a predicted "2" here but not in `vqaEval.py`,
    and the scores of such questions differ.
    """
    if isinstance(answers, str):
        raise TypeError(
            f"answers must be a sequence of strings, got the string {answers!r}; "
            "wrap a single answer in a list."
        )
    if not answers:
        raise ValueError("answers is empty: a question needs at least one answer.")
    target = _normalize(prediction)
    matches = [_normalize(answer) == target for answer in answers]
    total = sum(matches)
    if not leave_one_out:
        return min(total / 3.0, 1.0)
    if len(matches) < 2:
        raise ValueError(
            "the leave-one-out score needs at least 2 human answers, got 1; "
            "pass leave_one_out=False to score a single answer."
        )
    # Leaving out a matching answer removes one match; leaving out any other
    # answer keeps all of them.
    subset_scores = [min((total - match) / 3.0, 1.0) for match in matches]
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    annotations: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
    *,
    leave_one_out: bool = True,
    allow_missing: bool = False,
) -> dict[str, float]:
    """Compute the VQA accuracy of predicted answers, overall and per answer type.

    Args:
      predictions: question id to predicted answer.
      annotations: question id to its human answers.
      answer_types: optional question id to answer type ("yes/no", "number",
        "other" in VQA v2); it must cover every scored question.
      leave_one_out: True for the official score, False for the simple one (see
        `vqa_score`).
      allow_missing: whether annotated questions without a prediction are
        allowed. If True they are left out of the accuracy and counted in
        `missing_predictions`. If False (the default, as the official
        evaluation requires a result for every question) they raise.

    Returns:
      `accuracy` (percent, the mean score of the predicted questions times 100),
      `questions` (how many were scored) and `missing_predictions`. With answer
      types, also `accuracy_TYPE` and `questions_TYPE` per type, where TYPE is
      the type lower-cased with each run of other characters than letters and
      digits replaced by "_" ("yes/no" becomes "yes_no").

    Raises:
      ValueError: a prediction has no annotation, annotated questions lack a
        prediction while `allow_missing` is False, no question is left to
        score, or a scored question has no answer type.
    """
    unknown = [qid for qid in predictions if qid not in annotations]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have question ids without an annotation "
            f"(first: {unknown[:5]}); predict on the split the annotations cover."
        )
    missing = len(annotations) - len(predictions)
    if missing and not allow_missing:
        absent = [qid for qid in annotations if qid not in predictions]
        raise ValueError(
            f"{missing} of {len(annotations)} annotated questions have no "
            f"prediction (first: {absent[:5]}); predict every question or pass "
            "allow_missing=True to score only the predicted ones."
        )
    if not predictions:
        raise ValueError("no predictions to score.")
    if missing:
        logger.warning(
            "VQA accuracy covers %d of %d annotated questions; %d have no prediction",
            len(predictions),
            len(annotations),
            missing,
        )

    scores = {
        qid: vqa_score(answer, annotations[qid], leave_one_out=leave_one_out)
        for qid, answer in predictions.items()
    }
    result = {
        "accuracy": 100.0 * float(np.mean(list(scores.values()))),
        "questions": len(scores),
        "missing_predictions": missing,
    }
    if answer_types is not None:
        result.update(_accuracy_per_type(scores, answer_types))
    return result


def _accuracy_per_type(
    scores: Mapping[Hashable, float], answer_types: Mapping[Hashable, str]
) -> dict[str, float]:
    untyped = [qid for qid in scores if qid not in answer_types]
    if untyped:
        raise ValueError(
            f"{len(untyped)} scored questions have no answer type (first: "
            f"{untyped[:5]}); give answer_types for every question or none."
        )
    by_type: dict[str, list[float]] = {}
    key_of_type: dict[str, str] = {}
    for qid, score in scores.items():
        answer_type = answer_types[qid]
        key = re.sub(r"[^0-9a-z]+", "_", answer_type.lower()).strip("_")
        if key_of_type.setdefault(key, answer_type) != answer_type:
            raise ValueError(
                f"answer types {key_of_type[key]!r} and {answer_type!r} both give "
                f"the result key {key!r}; rename one of them."
            )
        by_type.setdefault(key, []).append(score)
    result: dict[str, float] = {}
    for key in sorted(by_type):
        result[f"accuracy_{key}"] = 100.0 * float(np.mean(by_type[key]))
        result[f"questions_{key}"] = len(by_type[key])
    return result


def logits_to_answers(logits: np.ndarray, vocab: Sequence[str]) -> list[str]:
    """Decode classifier logits to answer strings by taking the argmax.

    Args:
      logits: (questions, answers) scores over the answer vocabulary. Of equal
        maxima the lowest vocabulary index wins.
      vocab: the answer strings, in the order of the logits' last axis.

    Raises:
      ValueError: `logits` is not 2-D, or its width differs from `len(vocab)`.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(
            f"logits must have shape (questions, answers), got {logits.shape}."
        )
    if logits.shape[1] != len(vocab):
        raise ValueError(
            f"logits have {logits.shape[1]} answers per question but the vocabulary "
            f"has {len(vocab)}; pass the answer vocabulary the classifier was "
            "trained with."
        )
    if np.isnan(logits).any():
        rows = np.flatnonzero(np.isnan(logits).any(axis=1))
        raise ValueError(
            f"logits of {len(rows)} questions contain NaN (first rows: "
            f"{rows[:5].tolist()}); check the model's inputs."
        )
    return [vocab[index] for index in np.argmax(logits, axis=1)]
