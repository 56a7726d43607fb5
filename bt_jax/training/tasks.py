"""Fine-tuning tasks: their losses, and models started from a pretrained checkpoint.

A run's `task` decides the model it trains and the loss of each step:

| task        | model                                   | loss                          |
|-------------|-----------------------------------------|-------------------------------|
| `pretrain`  | `BridgeTowerForPreTraining`             | MLM, ITM and ITC (objectives) |
| `retrieval` | `BridgeTowerForPreTraining`, ITM + ITC  | ITC, and ITM on hard negatives|
| `vqa`       | `BridgeTowerForVisualQuestionAnswering` | BCE against soft scores       |
| `nlvr2`     | `BridgeTowerForNLVR2`                   | cross-entropy over 2 classes  |
| `snli-ve`   | `BridgeTowerForVisualEntailment`        | cross-entropy over 3 classes  |

`finetuning_params` starts a task model from any checkpoint `from_pretrained`
reads. When the task trains at another resolution, it resamples the vision
position table with bicubic interpolation, as the original repository's
`adapt_position_encoding` does with `torch.nn.functional.interpolate`. For
NLVR2 it grows the token-type table to three rows, row 2 a copy of row 1 as in
the original. Heads the checkpoint lacks start from their initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bt_jax import hub
from bt_jax.config import TASK_HEADS, BridgeTowerConfig
from bt_jax.modeling import create_model
from bt_jax.modeling.vision import resample_position_table

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "retrieval", *TASK_HEADS)
POSITION_TABLE = ("vision_model", "visual", "embeddings", "position_embedding")
TOKEN_TYPES = ("token_type_embeddings",)


def check_task(task: str) -> str:
    """Return `task` if it is known; raise ValueError naming the choices otherwise."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; use one of {', '.join(TASKS)}.")
    return task


def task_loss(
    model, batch: dict[str, jax.Array], rng: jax.Array, task: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Return the loss of a classification task and its metrics, for one batch.

    Args:
      model: the task's model (`bt_jax.modeling.tasks`).
      batch: `pixel_values`, `input_ids`, `attention_mask`, and the targets:
        `vqa_targets` (batch, answers) soft scores for VQA, `labels` (batch,)
        for NLVR2 and SNLI-VE, and `pixel_values_2` for NLVR2.
      rng: dropout key.
      task: "vqa", "nlvr2" or "snli-ve".

    Returns:
      The loss and a dict with `loss`, and `vqa_score` (the mean soft score of
      the top answer, the training-time VQA score) or `accuracy`, both in
      percent like the tasks' evaluations.
    """
    ids, mask, pixels = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
    )
    if task == "vqa":
        targets = batch["vqa_targets"]
        output = model(ids, mask, pixels, labels=targets, dropout_rng=rng)
        predicted = jnp.argmax(output.logits, axis=-1)
        picked = jnp.take_along_axis(targets, predicted[:, None], axis=-1)[:, 0]
        score = 100.0 * jnp.mean(picked)
        return output.loss, {"loss": output.loss, "vqa_score": score}
    if task == "nlvr2":
        output = model(
            ids,
            mask,
            pixels,
            batch["pixel_values_2"],
            labels=batch["labels"],
            dropout_rng=rng,
        )
    elif task == "snli-ve":
        output = model(ids, mask, pixels, labels=batch["labels"], dropout_rng=rng)
    else:
        raise ValueError(f"task_loss has no loss for task={task!r}; use {TASK_HEADS}.")
    correct = jnp.argmax(output.logits, axis=-1) == batch["labels"]
    return output.loss, {"loss": output.loss, "accuracy": 100.0 * jnp.mean(correct)}


def task_config(
    config: BridgeTowerConfig,
    task: str,
    *,
    image_size: int | None = None,
    id2label: dict[int, str] | list[str] | None = None,
    head_layers: int | None = None,
    head_hidden_scale: float | None = None,
    head_dropout: float | None = None,
) -> BridgeTowerConfig:
    """Return the model config a task trains: `config` with the task's settings.

    NLVR2 gets three token types, `image_size` (when given) the resolution,
    and `id2label` the classes (the answer vocabulary for VQA). The other
    arguments set the head's shape (`BridgeTowerConfig` documents them).
    """
    check_task(task)
    changes = {}
    if image_size is not None and image_size != config.vision_config.image_size:
        vision = config.vision_config
        if image_size % vision.patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of the patch size "
                f"{vision.patch_size}; use for example "
                f"{image_size // vision.patch_size * vision.patch_size}."
            )
        changes["vision_config"] = dataclasses.replace(vision, image_size=image_size)
    if task == "nlvr2":
        changes["num_token_types"] = 3
    if id2label is not None:
        changes["id2label"] = id2label
    for name, value in (
        ("task_head_layers", head_layers),
        ("head_hidden_scale", head_hidden_scale),
        ("head_dropout", head_dropout),
    ):
        if value is not None:
            changes[name] = value
    if task in TASK_HEADS:
        changes["architectures"] = config.with_head(task).architectures
    return config.replace(**changes)


def adapt_backbone(
    flat: dict[tuple, np.ndarray], source: BridgeTowerConfig, target: BridgeTowerConfig
) -> dict[tuple, np.ndarray]:
    """Fit backbone parameters saved for `source` to the `target` config.

    `flat` maps parameter paths (as `nnx.to_flat_state` gives them, with or
    without the leading "bridgetower") to arrays. The position table is
    resampled to `target`'s image size, and the token-type table grows to
    `target.num_token_types` rows, each new row a copy of row 1.
    """
    grid = target.vision_config.image_size // target.vision_config.patch_size
    out = {}
    for path, array in flat.items():
        names = tuple(path[1:] if path[:1] == ("bridgetower",) else path)
        if names[:4] == POSITION_TABLE and array.shape[0] != grid * grid + 1:
            logger.info(
                "resampling the position table from %d to %d patches (%d px images)",
                array.shape[0] - 1,
                grid * grid,
                target.vision_config.image_size,
            )
            array = np.asarray(resample_position_table(jnp.asarray(array), grid, grid))
        elif names[:1] == TOKEN_TYPES and array.shape[0] < target.num_token_types:
            extra = target.num_token_types - array.shape[0]
            array = np.concatenate([array, np.repeat(array[1:2], extra, axis=0)])
        out[path] = array
    del source
    return out


def finetuning_params(
    path: str | os.PathLike,
    target: BridgeTowerConfig,
    head: str,
    *,
    seed: int = 0,
) -> dict:
    """Return the parameters (a plain nested dict) of `head` on `target`, from a checkpoint.

    The backbone comes from the checkpoint at `path`, fitted to `target` by
    `adapt_backbone`. Head weights come from the checkpoint when it contains the
    same head with the same shapes (resuming a fine-tuned model), and start
    from the model's initialisation otherwise, with a log line naming them.

    Raises:
      ValueError: a VQA checkpoint's answer count differs from `target`'s
        `id2label`, or the checkpoint's backbone does not fit `target`.
    """
    source = hub.load_config(path)
    saved_head = hub.checkpoint_head(path)
    fresh = create_model(target, head, seed=seed)
    fresh_flat = {
        tuple(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param))
    }
    if head in TASK_HEADS and saved_head != head:
        load_head = "model"
    else:
        # Pretraining heads load as `from_pretrained` does: those the
        # checkpoint has, and random ones for the rest.
        load_head = head
        if saved_head == head and head in TASK_HEADS:
            _check_same_labels(source, target, head, path)
        source = source.replace(
            contrastive_hidden_size=source.contrastive_hidden_size
            or target.contrastive_hidden_size,
            logit_scale_init_value=source.logit_scale_init_value
            or target.logit_scale_init_value,
        )
    _, params = hub.from_pretrained(
        path, head=load_head, config=source, init_missing_heads=True, seed=seed
    )
    loaded = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    if load_head == "model":
        loaded = {("bridgetower", *p): v for p, v in loaded.items()}
    loaded = adapt_backbone(loaded, source, target)

    flat, fresh_heads = {}, []
    for path_, value in fresh_flat.items():
        if path_ in loaded:
            if loaded[path_].shape != value.shape:
                raise ValueError(
                    f"{'.'.join(map(str, path_))} has shape {loaded[path_].shape} in "
                    f"{path} but {value.shape} in the task model; the checkpoint's "
                    "architecture differs from the config's."
                )
            flat[path_] = loaded[path_]
        else:
            if path_[0] == "bridgetower":
                raise ValueError(
                    f"{path} has no weights for {'.'.join(map(str, path_))}; it is not "
                    "a backbone of this architecture."
                )
            fresh_heads.append(".".join(map(str, path_)))
            flat[path_] = value
    if fresh_heads:
        logger.info(
            "initialising %d head tensors at random: %s",
            len(fresh_heads),
            ", ".join(sorted(fresh_heads)),
        )
    nested: dict = {}
    for path_, value in flat.items():
        node = nested
        for key in path_[:-1]:
            node = node.setdefault(key, {})
        node[path_[-1]] = value
    return nested


def _check_same_labels(source, target, head, path) -> None:
    if source.num_labels != target.num_labels:
        raise ValueError(
            f"the {head} head in {path} has {source.num_labels} classes but the "
            f"task has {target.num_labels} (config id2label, or the dataset's answer "
            "vocabulary); fine-tune with the checkpoint's labels or start the head "
            "from a backbone checkpoint."
        )
    if head == "vqa" and source.id2label != target.id2label:
        differing = [
            index
            for index in source.id2label
            if source.id2label[index] != target.id2label[index]
        ]
        first = differing[0]
        raise ValueError(
            f"the VQA head in {path} orders its {source.num_labels} answers "
            f"differently from the dataset's vocabulary ({len(differing)} differ; "
            f"answer {first} is {source.id2label[first]!r} there and "
            f"{target.id2label[first]!r} here); build the dataset with the "
            "checkpoint's answer list."
        )
