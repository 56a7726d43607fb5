"""VQA v2 answer normalisation, soft scores and the answer vocabulary.

The rules follow the official VQA evaluation script (Antol et al. 2015,
`vqaEval.py` in the VQA API): answers are lower-cased, punctuation is removed
or replaced by a space, number words become digits, articles are dropped and
contractions get their apostrophes back. The BridgeTower fine-tuning code
(inherited from ViLT and METER) uses the same normalisation to build its
answer vocabulary: every `multiple_choice_answer` of the train and val
annotations, normalised, kept when it occurs at least 9 times, numbered in
order of first appearance. For the 2014 train and val annotations this gives
3,129 answers. A question's soft target for an answer seen `n` times among its
10 human answers is 0.3 n capped at 1 (0, 0.3, 0.6, 0.9, then 1.0).
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_MIN_ANSWER_COUNT = 9

# Punctuation the VQA evaluation strips, in its order.
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# A full stop not followed by a digit (so "2.5" keeps it) is dropped.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# A comma between digits ("1,000") makes every punctuation mark vanish rather
# than become a space.
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions in their written form. The official table maps every spelling
# that lost some of the apostrophes ("dont", "couldntve", "couldn'tve") back to
# this form; `_contraction_table` derives those spellings.
_CONTRACTIONS = (  # noqa: SIM905 (the word list reads better as text)
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't "
    "hadn't hadn't've hasn't haven't he'd he'd've he'll he's how'd how'll how's "
    "i'd i'd've i'll isn't it'd it'd've it'll it's let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "'ow's'at shan't she'd she'd've she'll she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd we'd've we're we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
# NOTE: the official table also lists "Im" and "Ive" with capitals, which
# never match because answers are lower-cased first, so "im" stays "im" here
# too.


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        positions = [i for i, char in enumerate(word) if char == "'"]
        # Every way to drop one or more apostrophes, keeping the word's letters.
        for count in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, count):
                spelling = "".join(c for i, c in enumerate(word) if i not in dropped)
                table.setdefault(spelling, word)
    return table


_CONTRACTION_TABLE = _contraction_table()


def _strip_punctuation(text: str) -> str:
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if digit_comma or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD.sub("", text)


def _normalise_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTION_TABLE.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer the way the official evaluation does."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalise_words(_strip_punctuation(text))


def answer_score(count: int) -> float:
    """Return the soft score of an answer given by `count` of the 10 annotators."""
    return min(1.0, 0.3 * count)


def build_answer_vocab(
    answers: Iterable[str], min_count: int = DEFAULT_MIN_ANSWER_COUNT
) -> list[str]:
    """Build the answer vocabulary from `multiple_choice_answer` strings.

    The answers are normalised, and those seen at least `min_count` times are
    kept in order of first appearance.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}.")
    counts = collections.Counter(normalize_answer(answer) for answer in answers)
    return [answer for answer, count in counts.items() if count >= min_count]


def soft_targets(
    human_answers: Sequence[str], answer_index: dict[str, int]
) -> tuple[list[int], list[float]]:
    """Return the vocabulary labels and soft scores for one question.

    Args:
      human_answers: the annotators' answers (10 in VQA v2), not normalised.
      answer_index: answer string to vocabulary position.

    Returns:
      `(labels, scores)` for the normalised answers that are in the vocabulary,
      in order of first appearance among `human_answers`.
    """
    counts = collections.Counter(normalize_answer(answer) for answer in human_answers)
    labels, scores = [], []
    for answer, count in counts.items():
        if answer in answer_index:
            labels.append(answer_index[answer])
            scores.append(answer_score(count))
    return labels, scores


def dense_targets(
    labels: Sequence[int], scores: Sequence[float], num_answers: int
) -> np.ndarray:
    """Scatter sparse soft scores into a `(num_answers,)` float32 vector."""
    targets = np.zeros((num_answers,), np.float32)
    targets[np.asarray(labels, np.int64)] = np.asarray(scores, np.float32)
    return targets
