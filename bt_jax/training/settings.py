"""The settings of a training run: the config schema and its validation.

Config files in `configs/` start from `default_config()` and change fields;
`python -m train` overrides fields from the command line. `RunSettings.from_config`
checks every value and builds the typed settings the library takes
(`OptimizerConfig`, `ObjectiveConfig`, `PipelineConfig`), so a bad value fails
with a message naming the field before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from bt_jax.training.objectives import ObjectiveConfig
from bt_jax.training.optim import OptimizerConfig
from bt_jax.training.tasks import TASKS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots")


def default_config() -> ml_collections.ConfigDict:
    """Return every field a training config has, with its default.

    Top level:
      task: "pretrain" (MLM, ITM, ITC), "retrieval" (ITM and ITC), or a
        fine-tuning head: "vqa", "nlvr2", "snli-ve" (`bt_jax.training.tasks`).
      image_size: train at this resolution; the position table of `init_from`
        is resampled to it (bicubic). 0 keeps the model's.
      model: a model preset file (`configs/base.py`), a `config.json`, or a
        checkpoint directory, whose architecture is trained from random weights.
      init_from: a checkpoint directory `bt_jax.from_pretrained` reads; its
        architecture and weights start the run, and `model` is ignored. Heads
        it lacks start from random weights.
      tokenizer: a directory with the tokenizer files. Empty: the tokenizer of
        `init_from`, or else a byte-level BPE vocabulary of the model's
        vocabulary size trained on the training captions.
      seed: seeds the parameters, dropout, negative sampling and data order.
      mesh_shape: sizes of the mesh axes (data, fsdp, tensor); one -1 takes the
        remaining devices.
      global_batch_size: examples per step over all devices and hosts.
      accumulation_steps: microbatches per step; gradients are averaged.
      total_steps: steps to train; the learning-rate schedule ends here.
      dtype: "float32" or "bfloat16" compute (parameters stay float32).
      remat: recompute activations in the backward pass, per layer: "none",
        "full" (keep only layer inputs) or "dots" (keep matmul outputs).
      log_every_steps: steps between scalar logs.
    """
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.image_size = 0
    config.model = ""
    config.init_from = ""
    config.tokenizer = ""
    config.seed = 0
    config.mesh_shape = (-1, 1, 1)
    config.global_batch_size = 32
    config.accumulation_steps = 1
    config.total_steps = 1000
    config.dtype = "float32"
    config.remat = "none"
    config.log_every_steps = 50

    # The dataset: a directory built by `python -m bt_jax.data build` (or a
    # registered name with data_dir), or "samples" for the bundled photos.
    config.data = ml_collections.ConfigDict()
    config.data.dataset = ""
    config.data.data_dir = ""
    config.data.train_split = "train"
    config.data.eval_split = ""
    config.data.max_text_length = 50
    config.data.texts = "all"
    config.data.mlm_probability = 0.15
    config.data.worker_count = 0
    config.data.read_threads = 0  # 0: the pipeline's default

    config.objective = ml_collections.ConfigDict(dataclasses.asdict(ObjectiveConfig()))
    config.optimizer = ml_collections.ConfigDict(
        {
            field.name: getattr(OptimizerConfig(), field.name)
            for field in dataclasses.fields(OptimizerConfig)
            if field.name not in ("total_steps", "grad_clip_norm")
        }
    )
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    # The classifier of the vqa, nlvr2 and snli-ve tasks (`BridgeTowerConfig`
    # fields task_head_layers, head_hidden_scale and head_dropout). A head that
    # `init_from` already has keeps its own shape.
    config.head = ml_collections.ConfigDict()
    config.head.layers = 2
    config.head.hidden_scale = 2.0
    config.head.dropout = 0.0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True

    # Evaluation on `data.eval_split`. Pretraining: ITM accuracy and ITC
    # retrieval recall. Fine-tuning tasks: `bt_jax.evaluation`'s metrics, with
    # the ITC top `k_test` candidates re-ranked by ITM for retrieval.
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 1000  # 0: only at the end
    config.eval.batch_size = 64
    config.eval.max_images = 1000
    config.eval.k_test = 128

    # Fault injection for recovery tests: after step `signal_after_step` (0:
    # never) the program sends itself `signal`, "SIGKILL" (dies as a crashed
    # job would) or "SIGTERM" (saves and exits as a preempted job should).
    config.debug = ml_collections.ConfigDict()
    config.debug.signal_after_step = 0
    config.debug.signal = "SIGKILL"
    config.debug.log_batches = False
    return config


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A validated training config with the library's typed settings."""

    config: ml_collections.ConfigDict
    optimizer: OptimizerConfig
    objective: ObjectiveConfig
    dtype: Any

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, *, needs_data: bool = True
    ) -> RunSettings:
        """Check every field of `config`; `needs_data=False` allows no dataset.

        Raises:
          ValueError: a field is missing or has an invalid value; the message
            names the field and the accepted values.
        """
        _check_keys(config, default_config())
        if not config.model and not config.init_from:
            raise ValueError(
                "config.model and config.init_from are both empty; set "
                "--config.model=configs/base.py (a preset, config.json or "
                "checkpoint directory) or --config.init_from=CHECKPOINT_DIR."
            )
        if needs_data and not config.data.dataset:
            raise ValueError(
                "config.data.dataset is empty; set it to a dataset built with "
                "`python -m bt_jax.data build`, or to samples for the bundled photos."
            )
        _check_positive(config, "global_batch_size")
        _check_positive(config, "accumulation_steps")
        _check_positive(config, "total_steps")
        _check_positive(config, "log_every_steps")
        _check_positive(config.checkpoint, "keep", "checkpoint.")
        _check_positive(config.checkpoint, "every_steps", "checkpoint.")
        _check_positive(config.eval, "batch_size", "eval.")
        _check_positive(config.eval, "max_images", "eval.")
        _check_positive(config.eval, "k_test", "eval.")
        if config.task not in TASKS:
            raise ValueError(
                f"config.task must be one of {', '.join(TASKS)}, got {config.task!r}."
            )
        if not isinstance(config.image_size, int) or config.image_size < 0:
            raise ValueError(
                f"config.image_size must be a non-negative integer (0: the model's), "
                f"got {config.image_size!r}."
            )
        if config.head.layers not in (1, 2):
            raise ValueError(
                f"config.head.layers must be 1 or 2, got {config.head.layers!r}."
            )
        if not config.head.hidden_scale > 0:
            raise ValueError(
                "config.head.hidden_scale must be positive (2 for VQA and SNLI-VE, "
                f"1.5 for NLVR2 in the reference recipes), got {config.head.hidden_scale!r}."
            )
        if not 0 <= config.head.dropout < 1:
            raise ValueError(
                f"config.head.dropout must be in [0, 1), got {config.head.dropout!r}."
            )
        if config.task == "retrieval" and config.objective.mlm_weight:
            raise ValueError(
                "task=retrieval trains ITC and ITM only; set "
                "--config.objective.mlm_weight=0 (or use task=pretrain)."
            )
        if config.eval.every_steps < 0:
            raise ValueError(
                f"config.eval.every_steps must be >= 0 (0: only at the end), got "
                f"{config.eval.every_steps}."
            )
        if len(tuple(config.mesh_shape)) != 3:
            raise ValueError(
                f"config.mesh_shape must have 3 sizes (data, fsdp, tensor), got "
                f"{tuple(config.mesh_shape)}."
            )
        if config.dtype not in DTYPES:
            raise ValueError(
                f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}."
            )
        if config.remat not in REMAT_POLICIES:
            raise ValueError(
                f"config.remat must be one of {REMAT_POLICIES}, got {config.remat!r}."
            )
        if config.data.texts not in ("all", "one"):
            raise ValueError(
                f'config.data.texts must be "all" or "one", got {config.data.texts!r}.'
            )
        if not 0.0 <= config.data.mlm_probability < 1.0:
            raise ValueError(
                "config.data.mlm_probability must be in [0, 1), got "
                f"{config.data.mlm_probability}."
            )
        _check_positive(config.data, "max_text_length", "data.")
        if any(size == 0 or size < -1 for size in tuple(config.mesh_shape)):
            raise ValueError(
                f"config.mesh_shape sizes must be positive or -1, got "
                f"{tuple(config.mesh_shape)}."
            )
        if config.debug.signal not in ("SIGKILL", "SIGTERM"):
            raise ValueError(
                'config.debug.signal must be "SIGKILL" or "SIGTERM", got '
                f"{config.debug.signal!r}."
            )
        optimizer_fields = dict(config.optimizer)
        clip = optimizer_fields.pop("grad_clip_norm")
        if clip < 0:
            raise ValueError(
                f"config.optimizer.grad_clip_norm must be >= 0 (0: no clipping), got {clip}."
            )
        try:
            optimizer = OptimizerConfig(
                **optimizer_fields,
                total_steps=config.total_steps,
                grad_clip_norm=clip or None,
            )
            objective = ObjectiveConfig(**config.objective)
        except ValueError as error:
            raise ValueError(
                f"invalid config.optimizer or config.objective: {error}"
            ) from None
        return cls(config, optimizer, objective, DTYPES[config.dtype])


def _check_positive(section, name: str, prefix: str = "") -> None:
    value = section[name]
    if not isinstance(value, int) or value < 1:
        raise ValueError(
            f"config.{prefix}{name} must be a positive integer, got {value!r}."
        )


def _check_keys(config, reference, prefix: str = "config") -> None:
    """Reject fields the schema does not have, and report missing ones."""
    for key in config:
        if key not in reference:
            raise ValueError(
                f"{prefix}.{key} is not a training config field; known fields: "
                f"{', '.join(sorted(reference))}."
            )
        if isinstance(reference[key], ml_collections.ConfigDict):
            _check_keys(config[key], reference[key], f"{prefix}.{key}")
    for key in reference:
        if key not in config:
            raise ValueError(
                f"{prefix}.{key} is missing; start the config from "
                "bt_jax.training.settings.default_config()."
            )
