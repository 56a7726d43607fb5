"""The subcommands of `python -m convert`, one function each."""

from __future__ import annotations

import argparse
import logging
import os
import time

import jax.numpy as jnp

import bt_jax
from bt_jax.config import HEAD_ARCHITECTURES, load_preset
from bt_jax.fileio import atomic_directory
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
    """Convert a Hugging Face PyTorch checkpoint directory to a bt-jax directory."""
    _check_output(args.out, args.overwrite)
    started = time.perf_counter()
    logger.info("Reading %s", args.src)
    model, params = bt_jax.from_pretrained(
        args.src,
        head=args.head,
        param_dtype=_DTYPES[args.dtype],
        init_missing_heads=args.init_missing_heads,
    )
    logger.info("Writing %s", args.out)
    bt_jax.save_pretrained(model, params, args.out, overwrite=args.overwrite)
    logger.info("Done in %.1f s", time.perf_counter() - started)


def to_torch(args: argparse.Namespace) -> None:
    """Convert a bt-jax directory to a Hugging Face directory with model.safetensors."""
    _check_output(args.out, args.overwrite)
    started = time.perf_counter()
    logger.info("Reading %s", args.src)
    model, params = bt_jax.from_pretrained(args.src, param_dtype=None)
    logger.info("Writing %s", args.out)
    bt_jax.save_torch_checkpoint(model, params, args.out, overwrite=args.overwrite)
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
    if args.head == "itc" and (
        config.contrastive_hidden_size is None or config.logit_scale_init_value is None
    ):
        raise ValueError(
            f"--head itc needs contrastive_hidden_size and logit_scale_init_value, which "
            f"{args.config} does not set; use configs/large.py or add both to the preset."
        )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    torch_class = getattr(transformers, HEAD_ARCHITECTURES[args.head])
    logger.info("Building a random %s from %s", torch_class.__name__, args.config)
    model = torch_class(
        transformers.BridgeTowerConfig.from_dict(config.to_dict())
    ).eval()
    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        model.save_pretrained(staging)
    logger.info("Wrote %s", args.out)
