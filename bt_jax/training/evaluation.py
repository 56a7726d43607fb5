"""Evaluation during pretraining: ITM accuracy and image-text retrieval recall.

On a held-out split of (image, caption) pairs:

- ITM accuracy scores each pair as a match. It also scores each caption with
  the image of the batch member half a batch away as a non-match, unless both
  come from the same record. About half the scored pairs are positive.
- Retrieval ranks by the contrastive (ITC) similarity of the uni-modal
  embeddings: every caption against every distinct image (text-to-image), and
  every image against every caption (image-to-text; a hit when any caption of
  that image is in the top K). There is no ITM re-ranking of the candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from bt_jax import compiler, sharding
from bt_jax import evaluation as evaluation_metrics
from bt_jax.training.step import Trainer, TrainState

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


def recall_at_k(
    similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[int, float]:
    """Return the share of queries with a relevant item among the top K, per K.

    Args:
      similarity: (queries, items) scores, higher is better.
      relevant: (queries, items) booleans; each query needs at least one True.
    """
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant item.")
    # The rank of the best relevant item: items scoring strictly higher than it.
    best = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)
    rank = (similarity > best).sum(axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


class Evaluator:
    """Jitted evaluation functions for one `Trainer`, sharded like its batches."""

    def __init__(self, trainer: Trainer, host_batch_size: int):
        self.trainer = trainer
        self.host_batch_size = host_batch_size
        replicated = NamedSharding(trainer.mesh, PartitionSpec())
        self._embed = jax.jit(
            sharding.traced_under(trainer.mesh, self._embed_batch),
            in_shardings=(trainer.state_shardings.params, trainer.batch_sharding),
            out_shardings=replicated,
            compiler_options=compiler.compiler_options(),
        )
        self.heads = trainer.objective.heads

    def _embed_batch(self, params, batch):
        model = self.trainer.model_from_params(params)
        ids, mask, pixels = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
        )
        outputs = {}
        if "itc" in self.heads:
            outputs["text_embeds"] = model.encode_text(ids, mask).astype(jnp.float32)
            outputs["image_embeds"] = model.encode_image(pixels).astype(jnp.float32)
        if "itm" in self.heads:
            outputs["itm_positive"] = model(ids, mask, pixels, heads="itm").itm_logits
            shifted = jnp.roll(pixels, -_negative_offset(len(pixels)), axis=0)
            outputs["itm_negative"] = model(ids, mask, shifted, heads="itm").itm_logits
        return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)

    def evaluate(
        self,
        state: TrainState,
        batches: Iterable[dict[str, np.ndarray]],
        steps: int,
    ) -> dict[str, float]:
        """Score the split that `batches` covers (one pass, unshuffled).

        Each batch contains this process's share of a global batch; the last one
        may be short and is padded here. Every process runs `steps` batches
        (the global batch count), because each one is a collective: a process
        whose share ran out feeds padding.
        """
        collected: dict[str, list[np.ndarray]] = {}
        iterator = iter(batches)
        last = None
        for _ in range(steps):
            batch = next(iterator, None)
            rows = 0 if batch is None else len(batch["record_index"])
            if batch is None:
                if last is None:
                    raise ValueError(
                        f"process {jax.process_index()} got no evaluation examples: "
                        "the split is smaller than one block of the evaluation "
                        "batch per process; lower eval.batch_size."
                    )
                batch = {name: value[:1] for name, value in last.items()}
            last = batch
            padded = _pad_batch(batch, self.host_batch_size)
            outputs = self._embed(state.params, self.trainer.shard_batch(padded))
            valid = multihost_utils.process_allgather(
                np.arange(len(padded["record_index"])) < rows, tiled=True
            )
            records = multihost_utils.process_allgather(
                padded["record_index"], tiled=True
            )
            collected.setdefault("valid", []).append(valid)
            collected.setdefault("record_index", []).append(records)
            collected.setdefault("next_record", []).append(
                np.roll(records, -_negative_offset(len(records)))
            )
            for name, value in outputs.items():
                collected.setdefault(name, []).append(np.asarray(value))
        if not collected:
            raise ValueError("the evaluation split produced no batches.")
        arrays = {name: np.concatenate(parts) for name, parts in collected.items()}
        valid = arrays.pop("valid")
        arrays = {name: value[valid] for name, value in arrays.items()}
        return _scores(arrays)


def _negative_offset(size: int) -> int:
    # Captions of one image sit next to each other in an unshuffled split, so the
    # negative image comes from half a batch away.
    return max(size // 2, 1)


def _scores(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    metrics: dict[str, float] = {"examples": float(len(arrays["record_index"]))}
    if "itm_positive" in arrays:
        different = arrays["record_index"] != arrays["next_record"]
        positive = arrays["itm_positive"].argmax(-1) == 1
        negative = arrays["itm_negative"][different].argmax(-1) == 0
        metrics["itm_accuracy"] = float(
            (positive.sum() + negative.sum()) / (len(positive) + len(negative))
        )
    if "text_embeds" in arrays:
        records = arrays["record_index"]
        image_ids, first = np.unique(records, return_index=True)
        images = arrays["image_embeds"][first]
        similarity = arrays["text_embeds"] @ images.T
        relevant = records[:, None] == image_ids[None, :]
        for k, value in recall_at_k(similarity, relevant).items():
            metrics[f"text_to_image_r{k}"] = value
        for k, value in recall_at_k(similarity.T, relevant.T).items():
            metrics[f"image_to_text_r{k}"] = value
        metrics["images"] = float(len(image_ids))
    return metrics


def _pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Repeat the last row until the batch has `rows` rows."""
    padded = {}
    for name, value in batch.items():
        value = np.asarray(value)
        missing = rows - len(value)
        if missing:
            value = np.concatenate([value, np.repeat(value[-1:], missing, axis=0)])
        padded[name] = value
    return padded


class TaskEvaluator:
    """Evaluation of a fine-tuning task (`bt_jax.evaluation`) over one pass of a split.

    - vqa: VQA accuracy of the top answer against the human answers.
    - nlvr2, snli-ve: accuracy.
    - retrieval: R@1/5/10 both ways. Every text and distinct image is embedded
      for ITC; the top `k_test` candidates of every query are then re-scored by
      the ITM head's match logit (`bt_jax.evaluation.rerank_scores`).

    Results are in percent, as papers report them (pretraining's `Evaluator`
    reports fractions).
    """

    def __init__(
        self,
        trainer: Trainer,
        host_batch_size: int,
        *,
        answers: Sequence[str] | None = None,
        annotations: dict[int, list[str]] | None = None,
        k_test: int = 128,
        score_answers: bool = True,
    ):
        if trainer.task == "pretrain":
            raise ValueError(
                "TaskEvaluator evaluates fine-tuning tasks; use Evaluator."
            )
        if trainer.task == "vqa" and (answers is None or annotations is None):
            raise ValueError(
                "VQA evaluation needs the answer vocabulary and the human answers of "
                "each question (`vqa_annotations(records)`)."
            )
        self.trainer = trainer
        self.task = trainer.task
        self.host_batch_size = host_batch_size
        self.answers = answers
        self.annotations = annotations
        self.k_test = k_test
        self.score_answers = score_answers
        # VQA: `[{"question_id", "answer"}]` of the last evaluation.
        self.predictions: list[dict] = []
        if trainer.task == "retrieval" and k_test < max(RECALL_KS):
            logger.warning(
                "k_test=%d is below %d, so R@K for K above %d counts only the "
                "re-ranked candidates",
                k_test,
                max(RECALL_KS),
                k_test,
            )
        replicated = NamedSharding(trainer.mesh, PartitionSpec())
        in_shardings = (trainer.state_shardings.params, trainer.batch_sharding)
        self._outputs = jax.jit(
            sharding.traced_under(trainer.mesh, self._batch_outputs),
            in_shardings=in_shardings,
            out_shardings=replicated,
            compiler_options=compiler.compiler_options(),
        )
        self._match = jax.jit(
            sharding.traced_under(trainer.mesh, self._match_logits),
            in_shardings=in_shardings,
            out_shardings=replicated,
            compiler_options=compiler.compiler_options(),
        )

    def _batch_outputs(self, params, batch):
        model = self.trainer.model_from_params(params)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pixels = batch["pixel_values"]
        if self.task == "retrieval":
            outputs = {
                "text_embeds": model.encode_text(ids, mask),
                "image_embeds": model.encode_image(pixels),
            }
        elif self.task == "nlvr2":
            outputs = {
                "logits": model(ids, mask, pixels, batch["pixel_values_2"]).logits
            }
        else:
            outputs = {"logits": model(ids, mask, pixels).logits}
        return jax.tree.map(lambda x: x.astype(jnp.float32), outputs)

    def _match_logits(self, params, batch):
        model = self.trainer.model_from_params(params)
        output = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            heads="itm",
        )
        return output.itm_logits[:, 1].astype(jnp.float32)

    def evaluate(
        self, params, batches: Iterable[dict[str, np.ndarray]], steps: int
    ) -> dict[str, float]:
        """Score the split that `batches` covers (one pass, unshuffled, `steps` batches)."""
        keep = {"vqa": ("question_id",), "retrieval": ("record_index",)}.get(
            self.task, ("labels",)
        )
        if self.task == "retrieval":
            keep += ("input_ids", "attention_mask", "pixel_values")
        arrays = _collect(self, params, batches, steps, keep)
        if self.task == "vqa":
            predicted = evaluation_metrics.logits_to_answers(
                arrays["logits"], self.answers
            )
            predictions = dict(
                zip(arrays["question_id"].tolist(), predicted, strict=True)
            )
            self.predictions = [
                {"question_id": qid, "answer": answer}
                for qid, answer in predictions.items()
            ]
            if not self.score_answers:
                return {}
            annotations = {qid: self.annotations[qid] for qid in predictions}
            return evaluation_metrics.vqa_accuracy(predictions, annotations)
        if self.task == "nlvr2":
            return evaluation_metrics.nlvr2_accuracy(arrays["logits"], arrays["labels"])
        if self.task == "snli-ve":
            return evaluation_metrics.snli_ve_accuracy(
                arrays["logits"], arrays["labels"]
            )
        return self._retrieval(params, arrays)

    def _retrieval(self, params, arrays) -> dict[str, float]:
        records = arrays["record_index"]
        image_ids, first, text_to_image = np.unique(
            records, return_index=True, return_inverse=True
        )
        similarity = arrays["text_embeds"] @ arrays["image_embeds"][first].T
        pixels = arrays["pixel_values"][first]
        rows = self.host_batch_size * jax.process_count()
        start = jax.process_index() * self.host_batch_size

        def score_pairs(texts: np.ndarray, images: np.ndarray) -> np.ndarray:
            count = len(texts)
            batch = {
                "input_ids": arrays["input_ids"][texts],
                "attention_mask": arrays["attention_mask"][texts],
                "pixel_values": pixels[images],
            }
            # Every process holds the whole pair list and feeds its block of rows.
            batch = _pad_batch(batch, rows)
            local = {
                name: value[start : start + self.host_batch_size]
                for name, value in batch.items()
            }
            scores = self._match(params, self.trainer.shard_batch(local))
            return np.asarray(scores)[:count]

        t2i, i2t = evaluation_metrics.rerank_scores(
            similarity, self.k_test, score_pairs, batch_size=rows
        )
        result = evaluation_metrics.retrieval_recall(t2i, i2t, text_to_image)
        result["texts"] = float(len(records))
        result["images"] = float(len(image_ids))
        return result


def vqa_annotations(records) -> dict[int, list[str]]:
    """Return each question id's human answers, from the records of a VQA split."""
    annotations = {}
    for index in range(len(records)):
        record = records[index]
        start = 0
        for question, count in zip(
            record["question_ids"], record["answers_per_question"], strict=True
        ):
            annotations[int(question)] = list(record["answers"][start : start + count])
            start += count
    return annotations


def _collect(evaluator, params, batches, steps: int, keep: Sequence[str]):
    """Run `evaluator._outputs` over `steps` batches; gather outputs and `keep` fields.

    Every process runs `steps` batches (the global batch count), because each
    one is a collective: a process whose share ran out feeds padding.
    """
    collected: dict[str, list[np.ndarray]] = {}
    iterator = iter(batches)
    last = None
    for _ in range(steps):
        batch = next(iterator, None)
        rows = 0 if batch is None else len(batch["input_ids"])
        if batch is None:
            if last is None:
                raise ValueError(
                    f"process {jax.process_index()} got no evaluation examples: the "
                    "split is smaller than one block of the evaluation batch per "
                    "process; lower the evaluation batch size (eval.batch_size, or "
                    "--batch-size of python -m train.evaluate)."
                )
            batch = {name: value[:1] for name, value in last.items()}
        last = batch
        padded = _pad_batch(batch, evaluator.host_batch_size)
        sharded = evaluator.trainer.shard_batch(padded)
        outputs = evaluator._outputs(params, sharded)
        valid = np.arange(evaluator.host_batch_size) < rows
        gathered = {"valid": valid, **{name: padded[name] for name in keep}}
        for name, value in gathered.items():
            value = multihost_utils.process_allgather(np.asarray(value), tiled=True)
            collected.setdefault(name, []).append(np.asarray(value))
        for name, value in outputs.items():
            collected.setdefault(name, []).append(np.asarray(value))
    if not collected:
        raise ValueError("the evaluation split produced no batches.")
    arrays = {name: np.concatenate(parts) for name, parts in collected.items()}
    valid = arrays.pop("valid")
    return {name: value[valid] for name, value in arrays.items()}
