"""The subcommands of `python -m convert`, one function each."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp

import bt_jax
from bt_jax import hub
from bt_jax.config import HEAD_ARCHITECTURES, BridgeTowerConfig, load_preset
from bt_jax.fileio import atomic_directory
from bt_jax.weights import original
from bt_jax.weights.io import write_safetensors
from bt_jax.weights.mapping import CheckpointMismatchError
from convert import verify as verify_module

logger = logging.getLogger("convert")

_DTYPES = {
    "keep": None,
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def _check_output(path: str, overwrite: bool) -> None:
    """Fail before any work when the output exists and may not be replaced."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"output directory already exists: {path}. Choose a new path or pass "
            "--overwrite to replace it."
        )


def to_jax(args: argparse.Namespace) -> None:
    """Convert a Hugging Face directory or an original `.ckpt` to a bt-jax directory."""
    _check_output(args.out, args.overwrite)
    if original.is_original_checkpoint(args.src):
        _original_to_jax(args)
        return
    for option in ("config", "answers"):
        if getattr(args, option, None) is not None:
            raise ValueError(
                f"--{option} applies to original .ckpt checkpoints; {args.src} is a "
                "Hugging Face directory, whose config.json describes the model."
            )
    started = time.perf_counter()
    logger.info("Reading %s", args.src)
    head = args.head
    if head is None and hub.stored_heads(args.src):
        head = hub.checkpoint_head(args.src)
    model, params = bt_jax.from_pretrained(
        args.src,
        head=head,
        param_dtype=_DTYPES[args.dtype],
        init_missing_heads=args.init_missing_heads,
    )
    extra = hub.processor_files(args.src)
    logger.info(
        "Writing %s (%s head, %d processor files)",
        args.out,
        hub.head_of(model),
        len(extra),
    )
    bt_jax.save_pretrained(
        model, params, args.out, overwrite=args.overwrite, extra_files=extra
    )
    logger.info("Done in %.1f s", time.perf_counter() - started)


def _original_to_jax(args: argparse.Namespace) -> None:
    """Convert an original microsoft/BridgeTower Lightning checkpoint.

    The renamed weights are written as a Hugging Face directory next to the
    output and loaded from there, so they pass the same strict checks as any
    Hugging Face checkpoint.
    """
    started = time.perf_counter()
    path = original.find_original_checkpoint(args.src)
    logger.info("Reading %s", path)
    checkpoint = original.load_original_checkpoint(path)
    config = _read_model_config(args.config) if args.config else None
    if config is not None and checkpoint.run_config is not None:
        logger.info(
            "Using %s instead of the checkpoint's hyper-parameters", args.config
        )
    answers = original.read_answers(args.answers) if args.answers else None
    conversion = original.prepare_conversion(
        checkpoint,
        config=config,
        head=args.head,
        answers=answers,
        init_missing_heads=args.init_missing_heads,
    )
    logger.info("%s", conversion.report.summary())
    source = args.config or "the checkpoint's hyper-parameters"
    out = Path(args.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f".{out.name}.original-", dir=out.parent
    ) as scratch:
        conversion.config.to_json_file(Path(scratch) / hub.CONFIG_FILE)
        write_safetensors(conversion.state_dict, Path(scratch) / "model.safetensors")
        try:
            model, params = bt_jax.from_pretrained(
                scratch,
                head=conversion.head,
                param_dtype=_DTYPES[args.dtype],
                init_missing_heads=args.init_missing_heads,
            )
        except CheckpointMismatchError as err:
            message = str(err).replace(
                str(Path(scratch) / "model.safetensors"), str(path)
            )
            raise CheckpointMismatchError(
                f"{message}\nThe keys above have their Hugging Face names: "
                "text_model. is text_transformer. in the .ckpt, vision_model.visual. "
                f"is vit_model.visual., and the config came from {source}."
            ) from None
    extra = hub.processor_files(path.parent)
    if not extra:
        logger.info(
            "No tokenizer or preprocessor files next to %s; copy them into %s to use "
            "bt_jax.inference.Predictor",
            path,
            args.out,
        )
    logger.info("Writing %s (%s head)", args.out, conversion.head)
    bt_jax.save_pretrained(
        model, params, args.out, overwrite=args.overwrite, extra_files=extra
    )
    logger.info("Done in %.1f s", time.perf_counter() - started)


def _read_model_config(path: str) -> BridgeTowerConfig:
    """Read a preset (`.py`), a `config.json` or a checkpoint directory's config."""
    if path.endswith(".py"):
        return load_preset(path)
    if Path(path).is_dir():
        return hub.load_config(path)
    return BridgeTowerConfig.from_json_file(path)


def to_torch(args: argparse.Namespace) -> None:
    """Convert a bt-jax directory to a Hugging Face directory with model.safetensors."""
    _check_output(args.out, args.overwrite)
    started = time.perf_counter()
    logger.info("Reading %s", args.src)
    model, params = bt_jax.from_pretrained(args.src, param_dtype=None)
    logger.info("Writing %s", args.out)
    bt_jax.save_torch_checkpoint(
        model,
        params,
        args.out,
        overwrite=args.overwrite,
        extra_files=hub.processor_files(args.src),
    )
    logger.info("Done in %.1f s", time.perf_counter() - started)


def verify(args: argparse.Namespace) -> dict:
    """Run the parity check and return its report."""
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}.")
    if not args.atol >= 0:
        raise ValueError(f"--atol must be a non-negative number, got {args.atol}.")
    return verify_module.verify(
        args.src,
        jax_dir=args.jax_dir,
        head=args.head,
        atol=args.atol,
        batch=args.batch,
        text_length=args.text_length,
        image_size=args.image_size,
        seed=args.seed,
        dtype=args.dtype,
        only=args.only.split(",") if args.only else None,
    )


def init_random(args: argparse.Namespace) -> None:
    """Write a randomly initialised transformers checkpoint of a model preset."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ImportError(
            "init-random builds the model with PyTorch; install it with "
            "`pip install torch==2.13.0`."
        ) from None
    _check_output(args.out, args.overwrite)
    config = load_preset(args.config).with_head(args.head)
    heads = args.head.split("+")
    if "itc" in heads and (
        config.contrastive_hidden_size is None or config.logit_scale_init_value is None
    ):
        raise ValueError(
            f"--head itc needs contrastive_hidden_size and logit_scale_init_value, which "
            f"{args.config} does not set; use configs/large.py or add both to the preset."
        )
    if args.processor and config.text_config.vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"--processor trains a byte-level tokenizer, which needs vocab_size >= "
            f"{MIN_BPE_VOCAB}, but {args.config} has "
            f"{config.text_config.vocab_size}; use configs/sample.py."
        )
    transformers.utils.logging.disable_progress_bar()
    torch_config = transformers.BridgeTowerConfig.from_dict(config.to_dict())
    state = {}
    for head in heads:
        torch.manual_seed(args.seed)
        torch_class = getattr(transformers, HEAD_ARCHITECTURES[head])
        logger.info("Building a random %s from %s", torch_class.__name__, args.config)
        model = torch_class(torch_config).eval()
        # The backbone comes from the first class; the others add their heads.
        first = not state
        for key, tensor in model.state_dict().items():
            if first or not key.startswith("bridgetower."):
                state[key] = tensor.detach().numpy()
    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        if len(heads) == 1:
            model.save_pretrained(staging)
        else:
            torch_config.architectures = list(config.architectures)
            torch_config.save_pretrained(staging)
            write_safetensors(state, staging / "model.safetensors")
        if args.processor:
            _write_sample_processor(config, staging)
    logger.info("Wrote %s", args.out)


# A byte-level BPE vocabulary contains 256 byte tokens and 5 special tokens
# before any merge, and it needs a few dozen merges to be useful.
MIN_BPE_VOCAB = 300


def _write_sample_processor(config, directory) -> None:
    """Write preprocessor_config.json and a tokenizer trained on the sample captions."""
    from bt_jax import processing, samples

    captions = [
        caption for photo in samples.load_samples() for caption in photo.captions
    ]
    tokenizer = processing.train_tokenizer(
        captions, directory, vocab_size=config.text_config.vocab_size
    )
    image_size = config.vision_config.image_size
    processing.BridgeTowerImageProcessor(size=image_size).save_pretrained(directory)
    logger.info(
        "Wrote a %d-token tokenizer and %d px preprocessing", len(tokenizer), image_size
    )
