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
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

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

# The official evaluation's contraction table, as "spelling=written form"
# pairs. It lists only some spellings without apostrophes: "its", "ill" and
# "shell" stay as they are, because they are ordinary words. Its quirks are kept
# so that normalised answers match the official ones, such as "somebody'd"
# becoming "somebodyd".
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't
couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't
dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've
itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
"""
# NOTE: the official table also has "Id've", "I'dve", "Im" and "Ive" with
# capitals. They never match because answers are lower-cased first, so they
# are left out and "im" stays "im".
_CONTRACTION_TABLE = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


def _strip_punctuation(text: str) -> str:
    # Whether a mark is dropped or becomes a space depends on the input text,
    # not on the text after earlier marks were replaced.
    digit_comma = _DIGIT_COMMA.search(text) is not None
    result = text
    for mark in _PUNCTUATION:
        if digit_comma or f"{mark} " in text or f" {mark}" in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD.sub("", result)


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


def check_answer_vocab(vocab: Sequence[str]) -> None:
    """Check an answer vocabulary given by the user.

    Raises ValueError unless it is a non-empty list of distinct strings, and
    warns about entries that are not normalised: human answers are normalised
    before the lookup, so an entry like "Red" never gets a target.
    """
    if not vocab:
        raise ValueError("the answer vocabulary is empty.")
    if not all(isinstance(answer, str) for answer in vocab):
        raise ValueError("the answer vocabulary must contain only strings.")
    if len(set(vocab)) != len(vocab):
        repeated = [a for a, n in collections.Counter(vocab).items() if n > 1]
        raise ValueError(f"the answer vocabulary repeats {repeated[:5]}.")
    raw = [(a, normalize_answer(a)) for a in vocab if normalize_answer(a) != a]
    if raw:
        examples = ", ".join(f"{a!r} -> {n!r}" for a, n in raw[:5])
        logger.warning(
            "%d answers in the vocabulary are not normalised (%s) and never match "
            "a normalised human answer; store them as normalize_answer returns them",
            len(raw),
            examples,
        )


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


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """Read a VQA answer list in label order from any file that records one.

    Accepts a JSON list of answers; a model's `config.json` (its `id2label`);
    a built VQA dataset's `metadata.json` (its `answer_vocab`); an object with
    a "label2ans" list (the original repository's name); an object mapping
    each answer to its label 0..N-1; or a folder holding `config.json` or
    `metadata.json`.

    Raises:
      ValueError: the file is unreadable, holds none of these, or lists an
        answer twice.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("config.json", "metadata.json"):
            if (path / name).is_file():
                path = path / name
                break
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the answer list {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("bt_jax"), dict):
        data = data["bt_jax"]
    if isinstance(data, dict):
        if isinstance(data.get("id2label"), dict):
            table = data["id2label"]
            try:
                data = [table[str(index)] for index in range(len(table))]
            except KeyError:
                raise ValueError(
                    f"the id2label of {path} does not number its labels 0.."
                    f"{len(table) - 1}."
                ) from None
        else:
            for key in ("label2ans", "answer_vocab"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
    if isinstance(data, dict):
        # An answer -> label mapping; no label may be renumbered.
        labels = sorted(
            data.values(), key=lambda label: (type(label) is not int, label)
        )
        if labels != list(range(len(data))):
            raise ValueError(
                f"the labels in {path} must be the integers 0 to {len(data) - 1}, "
                "each used once."
            )
        data = sorted(data, key=data.__getitem__)
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(answer, str) for answer in data)
    ):
        raise ValueError(
            f"{path} must contain a JSON list of answers in label order, a model "
            "config.json with id2label, a VQA dataset's metadata.json, or an object "
            "mapping answers to labels 0..N-1."
        )
    repeated = sorted(a for a, n in collections.Counter(data).items() if n > 1)
    if repeated:
        raise ValueError(f"{path} lists these answers more than once: {repeated[:5]}")
    return data
