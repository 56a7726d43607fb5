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

from bt_jax import sharding
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
