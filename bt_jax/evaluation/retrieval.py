"""Image-text retrieval recall with ITM re-ranking, as BridgeTower evaluates it.

The evaluation follows the ALBEF recipe that BridgeTower's fine-tuning code
uses. The contrastive (ITC) similarity of every text and image picks the
`k` best candidates of each query. The ITM head then scores only those pairs,
and each query's candidates are ranked by that score. Candidates outside the
`k` keep a score of -inf. BridgeTower's code fills them with -100 instead, so
the two agree while ITM logits stay above -100.

Both score matrices have the layout (texts, images):

- text-to-image: row t ranks the images for text t, and its only relevant
  image is `text_to_image[t]`;
- image-to-text: column i ranks the texts for image i. All texts of the image
  are relevant, and the query is a hit when any of them is in the top K.

Ties are broken deterministically:

- Candidate selection: of equal similarities, the lower candidate index is
  taken first.
- Ranking: of equal scores, irrelevant candidates are ranked before relevant
  ones, so a tie never makes a hit. A relevant candidate outside the `k`
  therefore ranks below every other candidate: it counts as a hit only when
  K is at least the number of candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)

# Entries per argsort call in candidate selection. Argsorting a 25k x 5k
# similarity matrix in one piece would take 1 GB of int64 indices.
_SELECTION_ENTRIES = 1 << 24

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def top_k_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the column indices of the `k` highest scores in each row.

    Each row's indices are sorted by decreasing score, and of equal scores the
    lower index comes first. `k` larger than the number of columns is capped.
    """
    rows, columns = scores.shape
    k = min(k, columns)
    chunk = max(1, _SELECTION_ENTRIES // max(columns, 1))
    parts = []
    for start in range(0, rows, chunk):
        # A stable sort of the negated scores keeps equal scores in index order.
        order = np.argsort(-scores[start : start + chunk], axis=1, kind="stable")
        parts.append(order[:, :k])
    return np.concatenate(parts) if parts else np.zeros((0, k), np.int64)


def rerank_scores(
    similarity: np.ndarray,
    k: int,
    score_pairs: PairScorer,
    *,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score the ITC top-`k` candidates of every query with an ITM scorer.

    Args:
      similarity: (texts, images) ITC similarities.
      k: candidates per query (`k_test` in BridgeTower, 128 or 256). A `k` at
        least the number of candidates ranks every pair by ITM alone.
      score_pairs: the ITM scorer, called as `score_pairs(text_indices,
        image_indices)` with two int64 arrays of equal length. It returns one
        finite score per pair, higher for a better match. BridgeTower uses the
        ITM head's "match" logit. Pairs arrive sorted by text index, then
        image index.
      batch_size: the maximum number of pairs per `score_pairs` call.

    Returns:
      `(text_to_image, image_to_text)` float32 score matrices, both of shape
      (texts, images). In `text_to_image`, row t has the ITM scores of the top
      `k` images of text t and -inf elsewhere. In `image_to_text`, column i has
      the ITM scores of the top `k` texts of image i and -inf elsewhere. A pair
      in both top-`k` sets is scored once and has the same score in both.

    Raises:
      ValueError: `similarity` is not a non-empty 2-D array of finite values,
        `k` or `batch_size` is below 1, or `score_pairs` returns a wrong shape or
        a non-finite score.
    """
    similarity = _check_matrix(similarity, "similarity")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    num_texts, num_images = similarity.shape

    image_candidates = top_k_candidates(similarity, k)  # (texts, k) image ids
    text_candidates = top_k_candidates(similarity.T, k)  # (images, k) text ids
    t2i_texts = np.repeat(np.arange(num_texts), image_candidates.shape[1])
    t2i_images = image_candidates.reshape(-1)
    i2t_images = np.repeat(np.arange(num_images), text_candidates.shape[1])
    i2t_texts = text_candidates.reshape(-1)

    # One code per (text, image) pair, so pairs chosen in both directions are
    # scored once. The unique codes come sorted by text, then image.
    t2i_codes = t2i_texts * num_images + t2i_images
    i2t_codes = i2t_texts * num_images + i2t_images
    codes = np.unique(np.concatenate([t2i_codes, i2t_codes]))
    pair_scores = _score_in_batches(
        codes // num_images, codes % num_images, score_pairs, batch_size
    )

    text_to_image = np.full((num_texts, num_images), -np.inf, np.float32)
    text_to_image[t2i_texts, t2i_images] = pair_scores[
        np.searchsorted(codes, t2i_codes)
    ]
    image_to_text = np.full((num_texts, num_images), -np.inf, np.float32)
    image_to_text[i2t_texts, i2t_images] = pair_scores[
        np.searchsorted(codes, i2t_codes)
    ]
    return text_to_image, image_to_text


def _score_in_batches(
    texts: np.ndarray, images: np.ndarray, score_pairs: PairScorer, batch_size: int
) -> np.ndarray:
    total = len(texts)
    batches = (total + batch_size - 1) // batch_size
    logger.info("ITM re-ranking: scoring %d pairs in %d batches", total, batches)
    scores = np.empty((total,), np.float32)
    reported_tenths = 0
    for batch, start in enumerate(range(0, total, batch_size)):
        stop = min(start + batch_size, total)
        values = np.asarray(score_pairs(texts[start:stop], images[start:stop]))
        if values.shape != (stop - start,):
            raise ValueError(
                f"score_pairs returned shape {values.shape} for {stop - start} pairs; "
                f"it must return one score per pair, shape ({stop - start},)."
            )
        if not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values))
            raise ValueError(
                f"score_pairs returned {len(bad)} non-finite scores in batch "
                f"{batch + 1} of {batches} (first pair: text {texts[start + bad[0]]}, "
                f"image {images[start + bad[0]]}, score {values[bad[0]]}); check "
                "the model's inputs for those pairs."
            )
        scores[start:stop] = values
        # One progress line per tenth of the pairs.
        tenths = 10 * stop // total
        if tenths > reported_tenths:
            reported_tenths = tenths
            logger.info(
                "ITM re-ranking: %d of %d pairs scored (%.0f%%)",
                stop,
                total,
                100.0 * stop / total,
            )
    return scores


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Return each query's 0-based rank of its best-ranked relevant candidate.

    Args:
      scores: (queries, candidates), higher is better; -inf is allowed, NaN is
        not.
      relevant: (queries, candidates) booleans, at least one True per row.

    Of equal scores, irrelevant candidates rank first. So the rank is the number
    of candidates that score higher than the best relevant score, plus the
    irrelevant candidates that score the same.
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape:
        raise ValueError(
            f"scores have shape {scores.shape} but relevant has {relevant.shape}; "
            "they must match."
        )
    if not relevant.any(axis=1).all():
        empty = np.flatnonzero(~relevant.any(axis=1))
        raise ValueError(
            f"{len(empty)} queries have no relevant candidate (first rows: "
            f"{empty[:5].tolist()}); every query needs at least one."
        )
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    higher = (scores > best).sum(axis=1)
    tied = ((scores == best) & ~relevant).sum(axis=1)
    return higher + tied


def retrieval_recall(
    t2i_scores: np.ndarray,
    i2t_scores: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Compute retrieval recall at each K in both directions, in percent.

    Args:
      t2i_scores: (texts, images) scores that rank the images of each text,
        such as the first matrix of `rerank_scores`.
      i2t_scores: (texts, images) scores that rank the texts of each image
        (down each column), such as the second matrix of `rerank_scores`.
        Pass the same matrix twice to rank both directions by one score, such
        as the ITC similarity.
      text_to_image: (texts,) the index of each text's image. Every image needs
        at least one text.
      ks: the cut-offs K.

    Returns:
      `text_to_image_rK` and `image_to_text_rK` for each K: the percentage of
      queries whose relevant candidate (for an image, any of its texts) ranks
      in the top K, with ties ranked as in `first_relevant_rank`. Also
      `r_mean`, the mean of all of these values.
    """
    t2i_scores = _check_matrix(t2i_scores, "t2i_scores", allow_inf=True)
    i2t_scores = _check_matrix(i2t_scores, "i2t_scores", allow_inf=True)
    if t2i_scores.shape != i2t_scores.shape:
        raise ValueError(
            f"t2i_scores has shape {t2i_scores.shape} but i2t_scores has "
            f"{i2t_scores.shape}; both must be (texts, images)."
        )
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}.")
    relevant = _relevance(np.asarray(text_to_image), *t2i_scores.shape)

    t2i_rank = first_relevant_rank(t2i_scores, relevant)
    i2t_rank = first_relevant_rank(i2t_scores.T, relevant.T)
    result: dict[str, float] = {}
    for k in ks:
        result[f"text_to_image_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
    for k in ks:
        result[f"image_to_text_r{k}"] = 100.0 * float(np.mean(i2t_rank < k))
    result["r_mean"] = float(np.mean(list(result.values())))
    return result


def _relevance(
    text_to_image: np.ndarray, num_texts: int, num_images: int
) -> np.ndarray:
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image has shape {text_to_image.shape} but the scores have "
            f"{num_texts} texts; give one image index per text."
        )
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(
            f"text_to_image must contain integer image indices, got dtype "
            f"{text_to_image.dtype}."
        )
    outside = (text_to_image < 0) | (text_to_image >= num_images)
    if outside.any():
        raise ValueError(
            f"text_to_image has image indices outside [0, {num_images}) (first: "
            f"{text_to_image[outside][:5].tolist()}); index the images of the "
            "score matrix's columns."
        )
    captionless = np.setdiff1d(np.arange(num_images), text_to_image)
    if len(captionless):
        raise ValueError(
            f"{len(captionless)} images have no text (first: "
            f"{captionless[:5].tolist()}); drop them from the score matrices, "
            "because image-to-text recall needs a relevant text for each image."
        )
    return text_to_image[:, None] == np.arange(num_images)[None, :]


def _check_matrix(
    values: np.ndarray, name: str, *, allow_inf: bool = False
) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(
            f"{name} must be a non-empty (texts, images) matrix, got shape "
            f"{values.shape}."
        )
    invalid = np.isnan(values) if allow_inf else ~np.isfinite(values)
    if invalid.any():
        kind = "NaN" if allow_inf else "NaN or infinite values"
        raise ValueError(
            f"{name} contains {int(invalid.sum())} {kind} (first at "
            f"{tuple(int(i) for i in np.argwhere(invalid)[0])}); check the "
            "embeddings or scores that produced it."
        )
    return values
