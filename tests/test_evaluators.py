"""Fine-tuning evaluators: VQA scores, retrieval recall, classification, results.

Expected values are computed by hand (the arithmetic is in the comments) or by
a brute-force loop over plain Python lists.
"""

import json
import logging
import math

import numpy as np
import pytest

from bt_jax.evaluation import (
    EVALUATORS,
    classification_accuracy,
    first_relevant_rank,
    get_evaluator,
    logits_to_answers,
    nlvr2_accuracy,
    rerank_scores,
    retrieval_recall,
    snli_ve_accuracy,
    vqa_accuracy,
    vqa_score,
    write_results,
)

# --- VQA ---------------------------------------------------------------------

# (prediction, human answers, simple score, leave-one-out score). With m of 10
# answers matching, the simple score is min(m / 3, 1). Leaving out one of the m
# matches leaves m - 1; leaving out one of the 10 - m others leaves m. So the
# leave-one-out score is (m * min((m - 1) / 3, 1) + (10 - m) * min(m / 3, 1)) / 10.
VQA_CASES = [
    # "Two" normalises to "2": m = 3, simple 1, LOO (3 * 2/3 + 7 * 1) / 10 = 0.9.
    ("2", ["Two"] * 3 + ["3"] * 7, 1.0, 0.9),
    # "a dog" loses its article: m = 1, simple 1/3, LOO (1 * 0 + 9 * 1/3) / 10 = 0.3.
    ("dog", ["a dog"] + ["cat"] * 9, 1 / 3, 0.3),
    # "dont" gets its apostrophe back: m = 2, simple 2/3,
    # LOO (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    ("dont", ["don't"] * 2 + ["do not"] * 8, 2 / 3, 0.6),
    # Trailing punctuation of the prediction is dropped: m = 10, both 1.
    ("yes.", ["yes"] * 10, 1.0, 1.0),
    # Trailing punctuation and case of the human answers: "Red!" and "red,"
    # become "red", m = 3, as in the first case.
    ("red", ["Red!", "red,", "red"] + ["blue"] * 7, 1.0, 0.9),
    # m = 4: simple 1, LOO (4 * 1 + 6 * 1) / 10 = 1.
    ("white", ["white"] * 4 + ["gray"] * 6, 1.0, 1.0),
    # No match: 0 for both.
    ("2", ["3"] * 10, 0.0, 0.0),
]


@pytest.mark.parametrize(("prediction", "answers", "simple", "official"), VQA_CASES)
def test_vqa_score_simple(prediction, answers, simple, official):
    assert vqa_score(prediction, answers, leave_one_out=False) == pytest.approx(simple)


@pytest.mark.parametrize(("prediction", "answers", "simple", "official"), VQA_CASES)
def test_vqa_score_leave_one_out(prediction, answers, simple, official):
    assert vqa_score(prediction, answers) == pytest.approx(official)


def test_vqa_score_string_answers_rejected():
    with pytest.raises(TypeError, match="wrap a single answer in a list"):
        vqa_score("yes", "yes")


def test_vqa_score_leave_one_out_needs_two_answers():
    with pytest.raises(ValueError, match="leave_one_out=False"):
        vqa_score("yes", ["yes"])


def test_vqa_score_empty_answers_rejected():
    with pytest.raises(ValueError, match="at least one answer"):
        vqa_score("yes", [])


VQA_PREDICTIONS = {1: "yes", 2: "2", 3: "cat", 4: "no"}
VQA_ANNOTATIONS = {
    1: ["yes"] * 10,  # m = 10: LOO 1, simple 1
    2: ["two"] * 2 + ["3"] * 8,  # m = 2: LOO 0.6, simple 2/3
    3: ["dog"] * 10,  # m = 0: 0 and 0
    4: ["no"] + ["yes"] * 9,  # m = 1: LOO 0.3, simple 1/3
}
VQA_TYPES = {1: "yes/no", 2: "number", 3: "other", 4: "yes/no"}


def test_vqa_accuracy_overall_leave_one_out():
    result = vqa_accuracy(VQA_PREDICTIONS, VQA_ANNOTATIONS)
    # (1 + 0.6 + 0 + 0.3) / 4 * 100 = 47.5
    assert result["accuracy"] == pytest.approx(47.5)
    assert result["questions"] == 4
    assert result["missing_predictions"] == 0


def test_vqa_accuracy_overall_simple():
    result = vqa_accuracy(VQA_PREDICTIONS, VQA_ANNOTATIONS, leave_one_out=False)
    # (1 + 2/3 + 0 + 1/3) / 4 * 100 = 50
    assert result["accuracy"] == pytest.approx(50.0)


def test_vqa_accuracy_per_answer_type():
    result = vqa_accuracy(VQA_PREDICTIONS, VQA_ANNOTATIONS, VQA_TYPES)
    # yes/no: questions 1 and 4, (1 + 0.3) / 2 * 100 = 65.
    assert result["accuracy_yes_no"] == pytest.approx(65.0)
    assert result["questions_yes_no"] == 2
    # number: question 2, 0.6 * 100 = 60.
    assert result["accuracy_number"] == pytest.approx(60.0)
    assert result["questions_number"] == 1
    # other: question 3, 0.
    assert result["accuracy_other"] == pytest.approx(0.0)
    assert result["accuracy"] == pytest.approx(47.5)


def test_vqa_accuracy_unknown_question_rejected():
    predictions = {**VQA_PREDICTIONS, 99: "yes"}
    with pytest.raises(ValueError, match=r"1 predictions .* without an annotation"):
        vqa_accuracy(predictions, VQA_ANNOTATIONS)


def test_vqa_accuracy_missing_prediction_rejected():
    predictions = {qid: VQA_PREDICTIONS[qid] for qid in (1, 2, 3)}
    with pytest.raises(ValueError, match=r"1 of 4 annotated questions .*\[4\]"):
        vqa_accuracy(predictions, VQA_ANNOTATIONS)


def test_vqa_accuracy_missing_prediction_counted():
    predictions = {qid: VQA_PREDICTIONS[qid] for qid in (1, 2, 3)}
    result = vqa_accuracy(predictions, VQA_ANNOTATIONS, allow_missing=True)
    # (1 + 0.6 + 0) / 3 * 100 = 53.333...
    assert result["accuracy"] == pytest.approx(160 / 3)
    assert result["questions"] == 3
    assert result["missing_predictions"] == 1


def test_vqa_accuracy_untyped_question_rejected():
    types = {qid: VQA_TYPES[qid] for qid in (1, 2, 3)}
    with pytest.raises(ValueError, match="1 scored questions have no answer type"):
        vqa_accuracy(VQA_PREDICTIONS, VQA_ANNOTATIONS, types)


def test_logits_to_answers_argmax():
    logits = np.array([[0.1, 2.0, -1.0], [-3.0, -4.0, -0.5]])
    assert logits_to_answers(logits, ["yes", "no", "2"]) == ["no", "2"]


def test_logits_to_answers_tie_lowest_index():
    logits = np.array([[3.0, 3.0, 0.0]])
    assert logits_to_answers(logits, ["yes", "no", "2"]) == ["yes"]


def test_logits_to_answers_width_mismatch():
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"have 3 answers .* vocabulary has 4"):
        logits_to_answers(logits, ["yes", "no", "2", "red"])


# --- Retrieval ---------------------------------------------------------------

# Three texts, two images: texts 0 and 1 show image 0, text 2 shows image 1.
SMALL_SIMILARITY = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
SMALL_ITM = np.array([[5.0, 1.0], [4.0, 2.0], [0.0, 3.0]], np.float32)
SMALL_TEXT_TO_IMAGE = np.array([0, 0, 1])


def _table_scorer(table, calls=None):
    def score_pairs(texts, images):
        if calls is not None:
            calls.append((texts.copy(), images.copy()))
        return table[texts, images]

    return score_pairs


def test_rerank_scores_top1_matrices():
    t2i, i2t = rerank_scores(SMALL_SIMILARITY, 1, _table_scorer(SMALL_ITM))
    inf = -np.inf
    # Each text keeps its most similar image: 0, 1, 1.
    np.testing.assert_array_equal(t2i, [[5.0, inf], [inf, 2.0], [inf, 3.0]])
    # Image 0 keeps text 0 (0.9 of 0.9, 0.2, 0.3); image 1 keeps text 1 (0.8).
    np.testing.assert_array_equal(i2t, [[5.0, inf], [inf, 2.0], [inf, inf]])


def test_retrieval_recall_small_top1():
    t2i, i2t = rerank_scores(SMALL_SIMILARITY, 1, _table_scorer(SMALL_ITM))
    result = retrieval_recall(t2i, i2t, SMALL_TEXT_TO_IMAGE, ks=(1, 2))
    # Text ranks: text 0 -> 0; text 1 (image 0 at -inf, image 1 at 2) -> 1;
    # text 2 -> 0. R@1 = 2/3, R@2 = 3/3.
    assert result["text_to_image_r1"] == pytest.approx(200 / 3)
    assert result["text_to_image_r2"] == pytest.approx(100.0)
    # Image 0: text 0 at 5 -> rank 0. Image 1: its text 2 is at -inf, below
    # text 1 (2) and the tied irrelevant text 0 (-inf) -> rank 2.
    # R@1 = R@2 = 1/2.
    assert result["image_to_text_r1"] == pytest.approx(50.0)
    assert result["image_to_text_r2"] == pytest.approx(50.0)
    # (200/3 + 100 + 50 + 50) / 4 = 66.666...
    assert result["r_mean"] == pytest.approx((200 / 3 + 200) / 4)


def test_retrieval_recall_small_all_candidates():
    # k = 2 keeps every pair, so ITM alone ranks: text 1 prefers image 0
    # (4 > 2), which ITC ranked second (0.2 < 0.8). Every rank is 0.
    t2i, i2t = rerank_scores(SMALL_SIMILARITY, 2, _table_scorer(SMALL_ITM))
    result = retrieval_recall(t2i, i2t, SMALL_TEXT_TO_IMAGE, ks=(1,))
    assert result["text_to_image_r1"] == 100.0
    assert result["image_to_text_r1"] == 100.0
    itc = retrieval_recall(
        SMALL_SIMILARITY, SMALL_SIMILARITY, SMALL_TEXT_TO_IMAGE, ks=(1,)
    )
    assert itc["text_to_image_r1"] == pytest.approx(200 / 3)


def test_rerank_scores_each_pair_once_in_batches():
    calls = []
    rerank_scores(SMALL_SIMILARITY, 2, _table_scorer(SMALL_ITM, calls), batch_size=4)
    # Both directions choose all 6 pairs; each is scored once, in batches of
    # at most 4: 4 + 2.
    assert [len(texts) for texts, _ in calls] == [4, 2]
    pairs = [
        (int(t), int(i))
        for texts, images in calls
        for t, i in zip(texts, images, strict=True)
    ]
    assert sorted(pairs) == [(t, i) for t in range(3) for i in range(2)]


def test_rerank_scores_logs_progress(caplog):
    with caplog.at_level(logging.INFO, logger="bt_jax.evaluation.retrieval"):
        rerank_scores(SMALL_SIMILARITY, 2, _table_scorer(SMALL_ITM), batch_size=1)
    assert "scoring 6 pairs in 6 batches" in caplog.text
    assert "6 of 6 pairs scored (100%)" in caplog.text


def _brute_force_recall(similarity, itm_table, text_to_image, k, ks):
    """Recall in percent from sorted Python lists, with the documented ties.

    Candidates: the k most similar, the lower index first among equals. Ranking:
    by ITM score (-inf outside the candidates), irrelevant before relevant among
    equals, then by index.
    """
    similarity = similarity.tolist()
    itm_table = itm_table.tolist()
    text_to_image = text_to_image.tolist()
    num_texts, num_images = len(similarity), len(similarity[0])

    def first_relevant_position(query_similarity, query_itm, relevant):
        count = len(query_similarity)
        by_similarity = sorted(range(count), key=lambda c: (-query_similarity[c], c))
        candidates = set(by_similarity[:k])
        scores = [query_itm[c] if c in candidates else -math.inf for c in range(count)]
        order = sorted(range(count), key=lambda c: (-scores[c], relevant[c], c))
        for position, candidate in enumerate(order):
            if relevant[candidate]:
                return position
        raise AssertionError("query without a relevant candidate")

    t2i_positions = []
    for t in range(num_texts):
        relevant = [i == text_to_image[t] for i in range(num_images)]
        t2i_positions.append(
            first_relevant_position(similarity[t], itm_table[t], relevant)
        )
    i2t_positions = []
    for i in range(num_images):
        column_similarity = [similarity[t][i] for t in range(num_texts)]
        column_itm = [itm_table[t][i] for t in range(num_texts)]
        relevant = [text_to_image[t] == i for t in range(num_texts)]
        i2t_positions.append(
            first_relevant_position(column_similarity, column_itm, relevant)
        )

    expected = {}
    for direction, positions in (
        ("text_to_image", t2i_positions),
        ("image_to_text", i2t_positions),
    ):
        for cutoff in ks:
            hits = sum(1 for position in positions if position < cutoff)
            expected[f"{direction}_r{cutoff}"] = 100.0 * hits / len(positions)
    return expected


def _random_retrieval_problem(seed, num_texts=23, num_images=7, ties=False):
    rng = np.random.default_rng(seed)
    # Every image gets at least one text; the rest are assigned at random.
    text_to_image = np.concatenate(
        [np.arange(num_images), rng.integers(0, num_images, num_texts - num_images)]
    )
    rng.shuffle(text_to_image)
    if ties:
        # Few distinct values, so both tie rules are exercised.
        similarity = rng.integers(0, 3, (num_texts, num_images)).astype(np.float64)
        itm = rng.integers(0, 3, (num_texts, num_images)).astype(np.float32)
    else:
        texts = rng.normal(size=(num_texts, 8))
        images = rng.normal(size=(num_images, 8))
        texts /= np.linalg.norm(texts, axis=1, keepdims=True)
        images /= np.linalg.norm(images, axis=1, keepdims=True)
        similarity = texts @ images.T
        itm = rng.normal(size=(num_texts, num_images)).astype(np.float32)
    return similarity, itm, text_to_image


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7, 23, 100])
def test_retrieval_recall_matches_brute_force(k, ties):
    # k = 7 keeps every image for a text; k >= 23 also keeps every text for an
    # image, so ITM alone ranks both directions.
    ks = (1, 2, 5, 10)
    similarity, itm, text_to_image = _random_retrieval_problem(seed=k, ties=ties)
    t2i, i2t = rerank_scores(similarity, k, _table_scorer(itm), batch_size=16)
    result = retrieval_recall(t2i, i2t, text_to_image, ks=ks)
    expected = _brute_force_recall(similarity, itm, text_to_image, k, ks)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name
    assert result["r_mean"] == pytest.approx(np.mean(list(expected.values())))


def test_retrieval_recall_top1_only_candidate_hits():
    # With k = 1 an image hits only through its single candidate text. Every
    # other text scores -inf, and its relevant ones rank below the irrelevant
    # ones, of which each image has 18 or more here. So R@10 equals R@1.
    similarity, itm, text_to_image = _random_retrieval_problem(seed=5)
    t2i, i2t = rerank_scores(similarity, 1, _table_scorer(itm))
    result = retrieval_recall(t2i, i2t, text_to_image)
    assert result["image_to_text_r10"] == result["image_to_text_r1"]


def test_first_relevant_rank_ties_irrelevant_first():
    scores = np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [-np.inf, 0.0, -np.inf]])
    relevant = np.array(
        [[False, True, False], [False, True, True], [True, False, False]]
    )
    # Row 0: two irrelevant ties go first -> 2. Row 1: 2.0 is higher, the
    # relevant pair ties with nothing irrelevant -> 1. Row 2: 0.0 is higher,
    # the irrelevant -inf ties first -> 2.
    np.testing.assert_array_equal(first_relevant_rank(scores, relevant), [2, 1, 2])


def test_rerank_scores_bad_score_shape():
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for 6 pairs"):
        rerank_scores(SMALL_SIMILARITY, 2, lambda texts, images: np.zeros(1))


def test_rerank_scores_nan_score():
    def score_pairs(texts, images):
        return np.where(texts == 1, np.nan, 0.0)

    with pytest.raises(ValueError, match=r"non-finite scores .* text 1"):
        rerank_scores(SMALL_SIMILARITY, 2, score_pairs)


def test_rerank_scores_k_zero():
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        rerank_scores(SMALL_SIMILARITY, 0, _table_scorer(SMALL_ITM))


def test_retrieval_recall_image_without_text():
    with pytest.raises(ValueError, match=r"1 images have no text \(first: \[1\]\)"):
        retrieval_recall(SMALL_SIMILARITY, SMALL_SIMILARITY, np.array([0, 0, 0]))


def test_retrieval_recall_text_count_mismatch():
    with pytest.raises(ValueError, match="scores have 3 texts"):
        retrieval_recall(SMALL_SIMILARITY, SMALL_SIMILARITY, np.array([0, 1]))


# --- Classification ----------------------------------------------------------


def test_nlvr2_accuracy_counts():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.5, 0.2]])
    labels = np.array([0, 1, 1, 1])
    result = nlvr2_accuracy(logits, labels)
    # Predictions 0, 1, 0, 0 against 0, 1, 1, 1: 2 of 4 correct = 50%.
    assert result["accuracy"] == pytest.approx(50.0)
    assert result["examples"] == 4
    assert result["correct"] == 2
    assert (result["false_examples"], result["false_predicted"]) == (1, 3)
    assert result["false_correct"] == 1
    assert (result["true_examples"], result["true_predicted"]) == (3, 1)
    assert result["true_correct"] == 1


def test_snli_ve_accuracy_counts():
    logits = np.array(
        [
            [0.0, 1.0, 2.0],  # predicts 2
            [5.0, 1.0, 2.0],  # predicts 0
            [0.0, 1.0, 0.5],  # predicts 1
            [0.0, 1.0, 2.0],  # predicts 2
            [-1.0, -2.0, 0.0],  # predicts 2
        ]
    )
    labels = np.array([2, 0, 0, 1, 2])
    result = snli_ve_accuracy(logits, labels)
    # Correct: examples 0, 1 and 4, 3 of 5 = 60%.
    assert result["accuracy"] == pytest.approx(60.0)
    # contradiction (0): labelled 1 and 2, predicted 1, correct 1.
    assert result["contradiction_examples"] == 2
    assert result["contradiction_predicted"] == 1
    assert result["contradiction_correct"] == 1
    # neutral (1): labelled 3, predicted 2, correct none.
    assert result["neutral_examples"] == 1
    assert result["neutral_predicted"] == 1
    assert result["neutral_correct"] == 0
    # entailment (2): labelled 0 and 4, predicted 0, 3 and 4, correct 0 and 4.
    assert result["entailment_examples"] == 2
    assert result["entailment_predicted"] == 3
    assert result["entailment_correct"] == 2


def test_classification_accuracy_default_class_names():
    result = classification_accuracy(np.array([[0.0, 1.0]]), np.array([1]))
    assert result["1_correct"] == 1
    assert result["0_examples"] == 0


def test_classification_label_count_mismatch():
    with pytest.raises(
        ValueError, match="labels have shape \\(3,\\) but logits have 2"
    ):
        nlvr2_accuracy(np.zeros((2, 2)), np.array([0, 1, 1]))


def test_classification_class_count_mismatch():
    with pytest.raises(ValueError, match="logits have 3 classes but class_names has 2"):
        nlvr2_accuracy(np.zeros((2, 3)), np.array([0, 1]))


def test_classification_label_out_of_range():
    with pytest.raises(ValueError, match=r"outside \[0, 3\) .* \[3\]"):
        snli_ve_accuracy(np.zeros((2, 3)), np.array([0, 3]))


def test_classification_float_labels_rejected():
    with pytest.raises(ValueError, match="labels must be integers"):
        nlvr2_accuracy(np.zeros((2, 2)), np.array([0.0, 1.0]))


# --- Registry and results ----------------------------------------------------


def test_evaluators_registry_tasks():
    assert set(EVALUATORS) == {"vqa", "retrieval", "nlvr2", "snli-ve"}
    assert get_evaluator("snli-ve") is snli_ve_accuracy
    assert get_evaluator("retrieval") is retrieval_recall


def test_get_evaluator_unknown_task():
    with pytest.raises(ValueError, match="unknown evaluation task 'gqa'; choose"):
        get_evaluator("gqa")


def test_write_results_files(tmp_path):
    result = {
        "accuracy": np.float32(76.54321),
        "questions": np.int64(3),
        "per_type": {"yes_no": 1.0},
        "loss": float("nan"),
    }
    json_path, table = write_results(result, tmp_path / "eval", "vqa_val")
    assert json_path == tmp_path / "eval" / "vqa_val.json"
    stored = json.loads(json_path.read_text())
    assert stored["accuracy"] == pytest.approx(76.54321, rel=1e-6)
    assert stored["questions"] == 3
    assert stored["per_type"] == {"yes_no": 1.0}
    assert stored["loss"] is None
    assert (tmp_path / "eval" / "vqa_val.txt").read_text() == table + "\n"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "vqa_val.json",
        "vqa_val.txt",
    ]


def test_write_results_table_aligned(tmp_path):
    _, table = write_results(
        {"accuracy": 76.54321, "questions": 3, "per_type": {"yes_no": 1.0}},
        tmp_path,
        "vqa",
    )
    # Key column: "per_type/yes_no" is 15 wide. Value column: "76.5432" is 7.
    assert table.splitlines() == [
        "metric             value",
        "---------------  -------",
        "accuracy         76.5432",
        "questions              3",
        "per_type/yes_no   1.0000",
    ]


def test_write_results_failure_keeps_old_file(tmp_path):
    write_results({"accuracy": 1.0}, tmp_path, "run")
    with pytest.raises(TypeError):
        write_results({"accuracy": object()}, tmp_path, "run")
    assert json.loads((tmp_path / "run.json").read_text()) == {"accuracy": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.txt"]


def test_write_results_name_with_directory():
    with pytest.raises(ValueError, match="plain file name"):
        write_results({"accuracy": 1.0}, ".", "sub/run")
