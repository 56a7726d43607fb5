"""Setup before a run's first step: processes, mesh, model config, data, processor.

Every check here runs before anything is compiled, so a bad mesh, batch size,
path or workdir fails in seconds with a message naming the value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import jax
import tensorflow_datasets as tfds

from bt_jax import hub, processing, sharding
from bt_jax.config import BridgeTowerConfig, load_preset
from bt_jax.data import open_records
from bt_jax.data.build import build_sample_dataset
from bt_jax.data.reading import Records
from bt_jax.training.step import Trainer
from bt_jax.training.tasks import task_config

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
COMPILATION_CACHE_DIR = "compilation_cache"
# ITC head sizes of the released bridgetower-large-itm-mlm-itc config.json.
ITC_DEFAULTS = {"contrastive_hidden_size": 512, "logit_scale_init_value": 2.6592}
TOKENIZER_DIR = "tokenizer"
# Captions read to train a tokenizer when none is given; more adds little.
TOKENIZER_TRAINING_RECORDS = 100_000
# Answers of the VQA v2 vocabulary the reference builds (train and val, at
# least 9 occurrences).
VQA_V2_ANSWERS = 3129
# The kind of dataset (`Records.task`) each training task reads.
DATASET_TASKS = {
    "retrieval": "captions",
    "vqa": "vqa",
    "nlvr2": "nlvr2",
    "snli-ve": "snli-ve",
}


def _launched_with_several_processes() -> bool:
    """Return whether a launcher JAX detects started several processes.

    Cloud TPU sets TPU_WORKER_HOSTNAMES. For Slurm, JAX reads the job step's
    variables, which only `srun` sets (a python started directly in an
    allocation is one process). Open MPI sets OMPI_COMM_WORLD_SIZE.
    """
    environ = os.environ
    if environ.get("TPU_WORKER_HOSTNAMES"):
        return True
    slurm = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(environ.get(name) for name in slurm):
        return int(environ["SLURM_NTASKS"]) > 1
    return int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed() -> None:
    """Join the other processes of a multi-host job, if this is one.

    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` name the
    coordinator (host:port of process 0) and this process explicitly. Under
    Cloud TPU, Slurm (srun) or Open MPI, JAX finds them itself. Without any of these
    the run is a single process.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            count = int(os.environ["JAX_NUM_PROCESSES"])
            index = int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and "
                f"JAX_PROCESS_ID must be integers too ({error!r})."
            ) from None
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif _launched_with_several_processes():
        jax.distributed.initialize()
    else:
        return
    logger.info(
        "joined %d processes as process %d (%d local devices of %d)",
        jax.process_count(),
        jax.process_index(),
        jax.local_device_count(),
        jax.device_count(),
    )


def configure_compilation_cache(workdir: Path, enabled: bool = True) -> Path | None:
    """Point JAX's compilation cache at `workdir/compilation_cache`, or turn it off.

    JAX's persistent compilation cache then stores every program that took
    longer than `jax_persistent_cache_min_compile_time_secs` (1 s by default)
    to compile. JAX keys each entry by a hash of the program, the devices, the
    compile options, XLA's flags and the platform's version, so a rerun of the
    same command (a resume) loads the train step instead of compiling it again.
    A process whose `JAX_COMPILATION_CACHE_DIR` is set keeps that directory.

    The compile options JAX hashes name a directory inside the cache (for
    XLA's GPU autotuning results), so entries are tied to the cache's path: a
    copied or moved workdir compiles again (checked with jax 0.10.2 on CPU).

    With `enabled=False` JAX's cache is off, even for a directory that
    `JAX_COMPILATION_CACHE_DIR` names. `JAX_ENABLE_COMPILATION_CACHE=false`
    keeps it off too.

    Returns:
      The cache directory in use, or None when the cache is off.
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        logger.info("compilation cache: off")
        return None
    if not jax.config.jax_enable_compilation_cache:
        logger.info("compilation cache: off (JAX_ENABLE_COMPILATION_CACHE)")
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        logger.info("compilation cache: %s (JAX_COMPILATION_CACHE_DIR)", configured)
        return Path(configured)
    directory = Path(workdir) / COMPILATION_CACHE_DIR
    jax.config.update("jax_compilation_cache_dir", str(directory))
    logger.info("compilation cache: %s", directory)
    return directory


def make_mesh(mesh_shape) -> jax.sharding.Mesh:
    """Build the (data, fsdp, tensor) mesh; raise ValueError if it does not fit."""
    try:
        return sharding.make_mesh(tuple(mesh_shape))
    except ValueError as error:
        raise ValueError(f"config.mesh_shape: {error}") from None


def check_batch(config, mesh: jax.sharding.Mesh) -> int:
    """Check that the global batch splits over the batch axes, microbatches and hosts.

    Returns:
      This process's share of each global batch.
    """
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    divisor = batch_ways * config.accumulation_steps
    if config.global_batch_size % divisor:
        raise ValueError(
            f"config.global_batch_size={config.global_batch_size} is not divisible by "
            f"the {batch_ways} batch shards (mesh data × fsdp) times "
            f"{config.accumulation_steps} accumulation steps; use a multiple of {divisor}."
        )
    processes = jax.process_count()
    eval_divisor = math.lcm(batch_ways, processes)
    if config.eval.batch_size % eval_divisor:
        raise ValueError(
            f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
            f"{eval_divisor} (the batch shards and processes); use a multiple of it."
        )
    return config.global_batch_size // processes


def make_trainer(config, settings, model_config, mesh) -> Trainer:
    """Build the train state's layout and the jitted step (nothing is compiled yet)."""
    return Trainer(
        model_config,
        settings.objective,
        settings.optimizer,
        mesh,
        accumulation_steps=config.accumulation_steps,
        dtype=settings.dtype,
        remat=config.remat,
        task=config.task,
    )


def heads_of(config, settings) -> tuple[str, ...]:
    """Return the heads a run trains: its task's, or the objectives' for (pre)training."""
    if config.task in ("pretrain", "retrieval"):
        return settings.objective.heads
    return (config.task,)


def check_dataset_task(config, records: Records) -> None:
    """Raise ValueError when the dataset is not the kind the task trains on."""
    expected = DATASET_TASKS.get(config.task)
    if expected is not None and records.task != expected:
        raise ValueError(
            f"task={config.task} trains on a {expected} dataset, but "
            f"{config.data.dataset} holds {records.task} data; build one with "
            f"`python -m bt_jax.data build FORMAT SOURCE --out DIR` or change config.task."
        )


def task_model_config(
    config, model_config: BridgeTowerConfig, records: Records | None
) -> BridgeTowerConfig:
    """Return the config of the model a task trains, from the loaded architecture.

    The classes come from the dataset (the VQA answer vocabulary, NLVR2's and
    SNLI-VE's label names). Without `records` (memory estimates), a new VQA
    head gets VQA v2's 3,129 answers. A head that `model_config` already has
    keeps its shape; a new one takes `config.head`.

    Raises:
      ValueError: the dataset is not the task's kind, or a VQA `init_from`
        head orders other answers than the dataset's vocabulary.
    """
    task = config.task
    if records is not None:
        check_dataset_task(config, records)
    if task in ("pretrain", "retrieval"):
        return task_config(model_config, task, image_size=config.image_size or None)
    id2label = None
    if task == "vqa" and records is None:
        id2label = model_config.id2label
        if model_config.default_head != "vqa":
            id2label = [f"answer_{index}" for index in range(VQA_V2_ANSWERS)]
    elif task == "vqa":
        id2label = list(records.answer_vocab or [])
        if not id2label:
            raise ValueError(
                f"{config.data.dataset} has no answer vocabulary; rebuild it with "
                "`python -m bt_jax.data build vqa SOURCE --out DIR`."
            )
        if model_config.default_head == "vqa":
            _check_head_answers(config, model_config, id2label)
    elif records is not None and getattr(records, "label_names", None):
        id2label = list(records.label_names)
    head = {}
    if model_config.default_head != task:
        head = dict(
            head_layers=config.head.layers,
            head_hidden_scale=config.head.hidden_scale,
        )
    return task_config(
        model_config,
        task,
        image_size=config.image_size or None,
        id2label=id2label,
        head_dropout=config.head.dropout,
        **head,
    )


def _check_head_answers(config, model_config, answers: list[str]) -> None:
    """Raise ValueError when the VQA head of `init_from` has other answers."""
    head = [model_config.id2label[index] for index in range(model_config.num_labels)]
    if head == answers:
        return
    order = " in another order" if sorted(head) == sorted(answers) else ""
    raise ValueError(
        f"the VQA head of {config.init_from} has {len(head)} answers but "
        f"{config.data.dataset} has a vocabulary of {len(answers)}{order}; rebuild "
        "the dataset with `--answer-vocab` set to the checkpoint's config.json, or "
        "start from a checkpoint without a VQA head."
    )


def check_eval_split(config, records: Records) -> None:
    """Raise ValueError when a VQA evaluation split has no human answers to score."""
    if config.task != "vqa" or not len(records):
        return
    if not any(records[0].get("answers_per_question", [])):
        raise ValueError(
            f"config.data.eval_split={config.data.eval_split} has no answers (a test "
            "split?); evaluate on val, and write test predictions with "
            "`python -m train.evaluate`."
        )


def load_model_config(config, heads=()) -> BridgeTowerConfig:
    """Read the architecture from `config.init_from` if set, else `config.model`.

    Presets and checkpoints without an ITC head leave its sizes unset; when
    `heads` include "itc" they get those of the released itm-mlm-itc
    checkpoints (`ITC_DEFAULTS`).
    """
    source = config.init_from or config.model
    path = Path(source)
    if path.suffix == ".py":
        model_config = load_preset(path)
    elif path.is_file():
        model_config = BridgeTowerConfig.from_json_file(path)
    else:
        model_config = hub.load_config(path)
    missing = {
        name: value
        for name, value in ITC_DEFAULTS.items()
        if getattr(model_config, name) is None
    }
    if "itc" in heads and missing:
        logger.info("the model config has no ITC sizes; using %s", missing)
        model_config = model_config.replace(**missing)
    return model_config


def check_workdir(
    workdir: Path, model_config: BridgeTowerConfig, heads, config
) -> dict:
    """Check the run recorded in a workdir that has checkpoints against this one.

    A workdir without checkpoints counts as new. Changed training settings
    (batch size, schedule, data) are logged as a warning, because a resumed
    run then no longer matches an uninterrupted one.

    Returns:
      The record of this run, for `record_run` once setup has succeeded.

    Raises:
      ValueError: the workdir contains checkpoints of another model.
    """
    record = json.loads(
        json.dumps(
            {
                "model": model_config.to_dict(),
                "heads": list(heads),
                "config": json.loads(config.to_json()),
            }
        )
    )
    path = workdir / RUN_FILE
    checkpoints = workdir / CHECKPOINT_DIR
    saved = checkpoints.is_dir() and any(
        entry.name.isdigit() for entry in checkpoints.iterdir()
    )
    if not (path.is_file() and saved):
        return record
    stored = json.loads(path.read_text(encoding="utf-8"))
    differences = _differences(
        {"model": stored.get("model"), "heads": stored.get("heads")},
        {"model": record["model"], "heads": record["heads"]},
    )
    if differences:
        raise ValueError(
            f"{workdir} contains a run of another model ({'; '.join(differences[:3])}). "
            "Use a new --workdir, or delete the old one to start over."
        )
    changed = [
        item
        for item in _differences(stored.get("config", {}), record["config"])
        if not item.startswith("debug.")
    ]
    if changed:
        logger.warning(
            "resuming with changed settings, so the run will not match an "
            "uninterrupted one: %s",
            "; ".join(changed[:10]),
        )
    return record


def record_run(workdir: Path, record: dict) -> None:
    """Write the run's model and settings to `run.json` (process 0 only)."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / RUN_FILE
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _differences(stored, current, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}{key}"
            if key not in stored or key not in current:
                found.append(f"{name} only in one of them")
            else:
                found.extend(_differences(stored[key], current[key], f"{name}."))
        return found
    if stored != current:
        return [f"{prefix.rstrip('.')}: {stored!r} stored, {current!r} now"]
    return []


def dataset_path(config, workdir: Path) -> str:
    """Return the dataset to read, building the bundled samples if asked for."""
    if config.data.dataset != "samples":
        return config.data.dataset
    target = workdir / "data"
    built = target / "bt_image_text"
    if not built.is_dir():
        if jax.process_index() == 0:
            logger.info("building the sample photos as a dataset in %s", target)
            # The builder shows its own progress bar, so TFDS's would repeat it.
            tfds.disable_progress_bar()
            build_sample_dataset(target)
        _sync("sample dataset")
    return str(built)


def open_split(config, dataset: str, split: str) -> Records:
    return open_records(dataset, split, data_dir=config.data.data_dir or None)


def load_processor(
    config, model_config: BridgeTowerConfig, records: Records, workdir: Path
) -> processing.BridgeTowerProcessor:
    """Return the processor: the tokenizer asked for, or one trained on the captions."""
    image_size = model_config.vision_config.image_size
    max_length = model_config.text_config.max_text_length
    source = config.tokenizer or config.init_from
    if source and _has_tokenizer(Path(source)):
        tokenizer = processing.load_tokenizer(source)
        # A tokenizer-only directory (or RoBERTa's own) has no image settings.
        if (Path(source) / "preprocessor_config.json").is_file():
            image_processor = processing.BridgeTowerImageProcessor.from_pretrained(
                source
            )
        else:
            image_processor = processing.BridgeTowerImageProcessor(size=image_size)
    elif config.tokenizer:
        raise FileNotFoundError(
            f"config.tokenizer={config.tokenizer!r} has no tokenizer files "
            "(vocab.json and merges.txt, or tokenizer.json)."
        )
    else:
        tokenizer = _trained_tokenizer(model_config, records, workdir / TOKENIZER_DIR)
        image_processor = processing.BridgeTowerImageProcessor(size=image_size)
    output_size = image_processor.output_shape(image_size, image_size)
    if output_size != (image_size, image_size) and config.image_size:
        # Fine-tuning at another resolution. The original resizes the short side
        # straight to the size and center-crops, with no flooring to a multiple
        # of 32 that would add black borders at sizes such as 574.
        logger.info(
            "resizing images to %d px for config.image_size, as the original "
            "fine-tuning does",
            image_size,
        )
        image_processor = dataclasses.replace(
            image_processor,
            size={"shortest_edge": image_size},
            crop_size=None,
            pipeline="original",
        )
        output_size = image_processor.output_shape(image_size, image_size)
    if output_size != (image_size, image_size):
        raise ValueError(
            f"the image processor makes {output_size} images but the model takes "
            f"{image_size} px; fix preprocessor_config.json in {source}."
        )
    vocab = model_config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
            f"has {vocab}; use a matching tokenizer or model."
        )
    return processing.BridgeTowerProcessor(
        image_processor, tokenizer, max_text_length=max_length
    )


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def _trained_tokenizer(model_config, records: Records, directory: Path):
    if _has_tokenizer(directory):
        return processing.load_tokenizer(directory)
    if jax.process_index() == 0:
        count = min(len(records), TOKENIZER_TRAINING_RECORDS)
        logger.info(
            "training a %d-token byte-level BPE tokenizer on the captions of %d records",
            model_config.text_config.vocab_size,
            count,
        )
        texts = [text for index in range(count) for text in records[index]["texts"]]
        processing.train_tokenizer(
            texts, directory, vocab_size=model_config.text_config.vocab_size
        )
    _sync("tokenizer")
    return processing.load_tokenizer(directory)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"bt_jax {name} ready")
