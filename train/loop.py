"""The training loop: restore or initialise, step, log, evaluate, checkpoint.

It pretrains, or fine-tunes on one task (`config.task`: retrieval, vqa, nlvr2,
snli-ve); evaluations of a task also go to `eval/TASK_stepN.json` and `.txt`.

`train_and_evaluate(config, workdir)` runs one training config to its
`total_steps`, resuming from the newest checkpoint in `workdir` when there is
one. A resumed run continues exactly: the state, the random key and the data
iterator's position all come from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bt_jax import hub
from bt_jax.checkpoint import CheckpointMismatchError, RunCheckpoints
from bt_jax.data import PipelineConfig, make_pipeline
from bt_jax.evaluation import write_results
from bt_jax.training import summary
from bt_jax.training.evaluation import Evaluator, TaskEvaluator, vqa_annotations
from bt_jax.training.metric_writer import MetricWriter
from bt_jax.training.settings import RunSettings
from bt_jax.training.step import Trainer
from bt_jax.training.tasks import finetuning_params
from train import report, setup

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
EVAL_DIR = "eval"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops without saving that state."""


class _StopRequest:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks
    between steps; a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning(
            "received %s; saving a checkpoint after this step (press Ctrl-C "
            "again to stop without saving)",
            name,
        )
        self.requested = True

    def anywhere(self) -> bool:
        """Return whether any process was asked to stop (a collective with several)."""
        if jax.process_count() == 1:
            return self.requested
        # NOTE: a collective on every step, so each host waits for the others
        # there; checking every few steps would cost less.
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _stage(message: str, *args) -> None:
    logger.info("== " + message, *args)


class _FirstRecords:
    """The first `count` records of a split, for a bounded evaluation."""

    def __init__(self, records, count: int):
        self._records = records
        self._count = min(count, len(records))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int):
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return self._records[index % self._count]

    def texts_per_record(self, progress: bool = True) -> list[int]:
        return self._records.texts_per_record(progress)[: self._count]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


def train_and_evaluate(config, workdir: str | Path) -> dict[str, Any]:
    """Train `config` in `workdir` to `config.total_steps`; return the final metrics.

    Raises:
      ValueError: the config, mesh, batch size, data or workdir is invalid
        (raised before anything is compiled).
      NonFiniteLossError: the loss became NaN or infinite.
    """
    settings = RunSettings.from_config(config)
    workdir = Path(workdir).absolute()

    _stage("devices and mesh")
    setup.initialize_distributed()
    mesh = setup.make_mesh(config.mesh_shape)
    host_batch = setup.check_batch(config, mesh)
    logger.info(
        "%d devices (%s), mesh %s, %d processes, %d examples per process per step",
        jax.device_count(),
        jax.devices()[0].platform,
        dict(mesh.shape),
        jax.process_count(),
        host_batch,
    )

    _stage("model and data")
    heads = setup.heads_of(config, settings)
    model_config = setup.load_model_config(config, heads)
    dataset = setup.dataset_path(config, workdir)
    train_records = setup.open_split(config, dataset, config.data.train_split)
    model_config = setup.task_model_config(config, model_config, train_records)
    run_record = setup.check_workdir(workdir, model_config, heads, config)
    eval_records = None
    if config.data.eval_split:
        eval_records = _FirstRecords(
            setup.open_split(config, dataset, config.data.eval_split),
            config.eval.max_images,
        )
    processor = setup.load_processor(config, model_config, train_records, workdir)
    uses_mlm = config.task == "pretrain" and bool(settings.objective.mlm_weight)
    pipeline_config = PipelineConfig(
        global_batch_size=config.global_batch_size,
        max_text_length=config.data.max_text_length,
        seed=config.seed,
        texts=config.data.texts,
        mlm_probability=config.data.mlm_probability if uses_mlm else 0.0,
        worker_count=config.data.worker_count,
        read_threads=config.data.read_threads or None,
    )

    _stage("train state")
    trainer = setup.make_trainer(config, settings, model_config, mesh)
    # The evaluator's checks run before anything is written to the workdir.
    evaluator = None
    if eval_records is not None:
        setup.check_dataset_task(config, eval_records)
        setup.check_eval_split(config, eval_records)
        evaluator = _make_evaluator(
            trainer, eval_records, processor, config, pipeline_config, workdir
        )
    abstract = trainer.abstract_state()
    checkpoints = RunCheckpoints(
        workdir / setup.CHECKPOINT_DIR,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    latest = checkpoints.latest_step()
    restore_as = abstract
    if latest is not None:
        restore_as = restore_target(trainer, checkpoints, latest, abstract)
    _log_parameters(trainer, abstract, workdir)

    iterator = iter(make_pipeline(train_records, processor, pipeline_config))
    if latest is not None:
        _stage("resuming from step %d in %s", latest, checkpoints.directory)
        state = checkpoints.restore(latest, restore_as, iterator)
        if restore_as is not abstract:
            state = trainer.stack_state(state)
    elif config.init_from and config.task == "pretrain" and not config.image_size:
        _stage("initialising from %s", config.init_from)
        _, params = hub.from_pretrained(
            config.init_from,
            head=trainer.head,
            mesh=mesh,
            init_missing_heads=True,
            seed=config.seed,
            config=model_config,
        )
        state = trainer.init_from_params(
            nnx.to_pure_dict(params), jax.random.key(config.seed)
        )
    elif config.init_from:
        _stage("initialising %s from %s", config.task, config.init_from)
        params = finetuning_params(
            config.init_from, model_config, trainer.head, seed=config.seed
        )
        state = trainer.init_from_params(params, jax.random.key(config.seed))
    else:
        _stage("initialising random weights (seed %d)", config.seed)
        state = trainer.init(jax.random.key(config.seed))

    setup.record_run(workdir, run_record)
    writer = MetricWriter(workdir)
    try:
        with _StopRequest() as stop, logging_redirect_tqdm():
            final = _loop(
                config,
                trainer,
                state,
                iterator,
                checkpoints,
                writer,
                evaluator,
                stop,
                workdir,
            )
    finally:
        writer.close()
        checkpoints.close()
        iterator.close()
    if final.get("stopped"):
        return final

    _stage("exporting the model to %s", workdir / MODEL_DIR)
    _export(trainer, final.pop("state"), processor, workdir / MODEL_DIR)
    if jax.process_index() == 0:
        text = report.write_report(workdir, config)
        logger.info("report:\n%s", text)
    return final


def restore_target(trainer: Trainer, checkpoints: RunCheckpoints, step: int, abstract):
    """Return the abstract state to restore checkpoint `step` into.

    That is `abstract` (the trainer's state), or, for a checkpoint that stores
    every layer on its own, the per-layer state of the same trainer with
    `scan_layers=False`. Checkpoints written before scanned layers were stored
    stacked have that layout; `Trainer.stack_state` converts the restored state.
    Raises `CheckpointMismatchError` for a checkpoint of another model.
    """
    try:
        checkpoints.check_compatible(step, abstract)
        return abstract
    except CheckpointMismatchError as mismatch:
        if not trainer.layout.runs:
            raise
        per_layer = dataclasses.replace(trainer, scan_layers=False).abstract_state()
        try:
            checkpoints.check_compatible(step, per_layer)
        except CheckpointMismatchError:
            raise mismatch from None
    logger.info(
        "checkpoint step %d stores each layer on its own; stacking the scanned "
        "runs after restoring it",
        step,
    )
    return per_layer


def _export(trainer: Trainer, state, processor, directory: Path) -> None:
    """Write the trained model where `bt_jax.from_pretrained` reads it."""
    params = state.params
    if jax.process_count() > 1:
        # Each process holds only its shards; process 0 gathers and writes all.
        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
    model = trainer.model_from_params(params)
    with tempfile.TemporaryDirectory() as scratch:
        processor.save_pretrained(scratch)
        hub.save_pretrained(
            model,
            nnx.state(model, nnx.Param),
            directory,
            overwrite=True,
            extra_files=sorted(Path(scratch).iterdir()),
        )


def _log_parameters(trainer: Trainer, abstract, workdir: Path) -> None:
    params = abstract.params
    shardings = trainer.state_shardings.params
    logger.info("parameters:\n%s", summary.parameter_overview(params, shardings))
    logger.info(
        "parameter shardings (layer indices as *):\n%s",
        summary.sharding_table(params, shardings, collapse_layers=True),
    )
    if jax.process_index() == 0:
        (workdir / "sharding.txt").write_text(
            summary.sharding_table(params, shardings, collapse_layers=False) + "\n",
            encoding="utf-8",
        )


def _make_evaluator(trainer, records, processor, config, train_pipeline, workdir):
    eval_pipeline = PipelineConfig(
        global_batch_size=config.eval.batch_size,
        max_text_length=config.data.max_text_length,
        seed=config.seed,
        num_epochs=1,
        shuffle=False,
        texts="all",
        mlm_probability=0.0,
        drop_remainder=False,
        worker_count=0,
        read_threads=train_pipeline.read_threads,
    )
    host_batch = config.eval.batch_size // jax.process_count()
    if config.task == "pretrain":
        evaluator = Evaluator(trainer, host_batch)
    else:
        evaluator = TaskEvaluator(
            trainer,
            host_batch,
            answers=records.answer_vocab if config.task == "vqa" else None,
            annotations=vqa_annotations(records) if config.task == "vqa" else None,
            k_test=config.eval.k_test,
        )
    pairs = sum(records.texts_per_record(progress=False))
    if pairs < config.eval.batch_size:
        # Every process needs rows in the first batch; its block of a short
        # one could be empty while the others wait for it.
        raise ValueError(
            f"the evaluation split {config.data.eval_split} has {pairs} pairs "
            f"(with eval.max_images={config.eval.max_images}), fewer than "
            f"eval.batch_size={config.eval.batch_size}; lower eval.batch_size."
        )
    steps = math.ceil(pairs / config.eval.batch_size)

    def run(state):
        batches = make_pipeline(records, processor, eval_pipeline)
        iterator = iter(batches)
        try:
            if config.task == "pretrain":
                return evaluator.evaluate(state, iterator, steps)
            result = evaluator.evaluate(state.params, iterator, steps)
        finally:
            iterator.close()
        if jax.process_index() == 0:
            step = int(jax.device_get(state.step))
            write_results(result, workdir / EVAL_DIR, f"{config.task}_step{step}")
        return result

    return run


def _loop(
    config, trainer, state, iterator, checkpoints, writer, evaluator, stop, workdir
):
    total = config.total_steps
    start = int(jax.device_get(state.step))
    if start >= total:
        logger.info(
            "step %d already reached total_steps=%d; nothing to train", start, total
        )
        return {"state": state, "step": start, "eval": {}}
    _stage("training steps %d to %d", start + 1, total)
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    last_eval: dict[str, float] = {}
    batch_log = None
    if config.debug.log_batches and jax.process_index() == 0:
        batch_log = (workdir / "batches.jsonl").open("a", encoding="utf-8")
    bar = tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    pending = None
    try:
        for step in range(start, total):
            batch = next(iterator)
            if batch_log is not None:
                _log_batch(batch_log, step + 1, batch)
            # NOTE: the first call compiles the step while the state exists, and
            # the compiler's freed heap stays resident. Trainer.compile_step
            # before creating the state avoided about 1 GiB of that at base size
            # on CPU; using it here needs the data's batch shapes up front.
            state, metrics = trainer.step(state, trainer.shard_batch(batch))
            # Read the previous step's metrics while this one runs.
            if pending is not None:
                window.append(_finish_step(*pending))
            pending = (step + 1, metrics)
            done = step + 1

            log_due = done % config.log_every_steps == 0 or done == total
            checkpoint_due = done % config.checkpoint.every_steps == 0 or done == total
            eval_due = evaluator is not None and (
                done == total
                or (config.eval.every_steps and done % config.eval.every_steps == 0)
            )
            if done == config.debug.signal_after_step:
                # Fault injection for tests: SIGKILL dies like a crashed job,
                # with no cleanup and any asynchronous save in flight lost.
                logger.warning(
                    "debug.signal_after_step=%d: sending %s to this process",
                    done,
                    config.debug.signal,
                )
                os.kill(os.getpid(), getattr(signal, config.debug.signal))
            stopping = stop.anywhere()
            if not (log_due or checkpoint_due or eval_due or stopping):
                bar.update(1)
                continue

            window.append(_finish_step(*pending))
            pending = None
            bar.update(1)
            if log_due or stopping:
                elapsed = time.perf_counter() - window_start
                scalars = _window_means(window)
                scalars["examples_per_second"] = (
                    len(window) * config.global_batch_size / max(elapsed, 1e-9)
                )
                writer.write(done, "train", scalars)
                bar.set_postfix(
                    loss=f"{scalars['loss']:.4f}",
                    lr=f"{scalars['lr']:.2e}",
                    ex_s=f"{scalars['examples_per_second']:.1f}",
                    refresh=False,
                )
                window = []
                window_start = time.perf_counter()
            if checkpoint_due or stopping:
                checkpoints.save(done, state, iterator)
            if stopping:
                checkpoints.wait()
                logger.warning(
                    "stopped at step %d on request; checkpoint saved in %s. Run the "
                    "same command to resume.",
                    done,
                    checkpoints.directory,
                )
                return {"stopped": True, "step": done}
            if eval_due:
                eval_start = time.perf_counter()
                last_eval = evaluator(state)
                logger.info(
                    "eval at step %d (%.1f s): %s",
                    done,
                    time.perf_counter() - eval_start,
                    _format_metrics(last_eval),
                )
                writer.write(done, "eval", last_eval)
                window_start = time.perf_counter()
    finally:
        bar.close()
        if batch_log is not None:
            batch_log.close()
    if pending is not None:
        _finish_step(*pending)
    return {"state": state, "step": total, "eval": last_eval}


def _finish_step(step: int, metrics) -> dict[str, float]:
    """Fetch a step's metrics; raise if its loss, gradients or new parameters
    are not finite, before that state can be checkpointed."""
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    for name, description in (
        ("loss", "the loss"),
        ("grad_norm", "the gradient norm"),
        ("param_norm", "the parameter norm after the update"),
    ):
        if name in values and not math.isfinite(values[name]):
            parts = ", ".join(
                f"{key} {value:.4g}" for key, value in sorted(values.items())
            )
            raise NonFiniteLossError(
                f"{description} is {values[name]} at step {step} ({parts}). The run "
                "stopped without saving this state; lower "
                "optimizer.learning_rate or set optimizer.grad_clip_norm (or use "
                "dtype=float32 if it is bfloat16), then resume from the last "
                "checkpoint."
            )
    return values


def _window_means(window: list[dict[str, float]]) -> dict[str, float]:
    names = window[-1].keys()
    return {name: float(np.mean([values[name] for values in window])) for name in names}


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def _log_batch(file, step: int, batch: dict[str, np.ndarray]) -> None:
    import json

    record = {
        "step": step,
        "record_index": np.asarray(batch["record_index"]).tolist(),
        "text_index": np.asarray(batch["text_index"]).tolist(),
    }
    file.write(json.dumps(record) + "\n")
    file.flush()
