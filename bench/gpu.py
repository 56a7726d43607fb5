"""bt-jax on one accelerator: bf16 training step and inference heads.

    python -m bench.gpu --json gpu.json [--sizes base large] [--batch base=32]

Run it on a machine with one GPU, such as an NVIDIA H200. For each model size
(a preset in configs/) it compiles and times, on random parameters and inputs:

- the bf16 training step of `bt_jax.training.step.Trainer` (MLM + ITM + ITC
  losses, AdamW update);
- bf16 forward passes of the ITM, ITC and MLM heads.

For each program it prints the compile time, the median step time over
`--steps` timed calls after `--warmup` untimed ones, image-text pairs per
second, and model FLOP utilisation (MFU): the analytic matmul FLOPs of
bench/flops.py per second, divided by `--peak-tflops`. It also prints the
device's peak memory, the compiled program's memory plan and which attention
implementation the compiled program contains. `--json` writes all of it with
the device kind, the versions and the flags, rewritten after every program so
that an interrupted run keeps what it measured.

Without an `implementation`, jax 0.10.2 lowers `jax.nn.dot_product_attention`
with plain XLA ops, and XLA's GPU compiler no longer rewrites attention into
cuDNN calls (openxla/xla pull request 22225 removed that pass). So on a GPU
the programs are traced under `bt_jax.modeling.layers.attention_implementation
("cudnn")` (`--attention auto`, the default), and the table shows whether
the compiled program contains the fused kernel. Attention with dropout (the training
step's text and cross-modal layers, unless `--no-attention-dropout`) keeps
bt-jax's explicit path.

The numbers mean something only on an accelerator. On a CPU the script warns
and still runs, as a smoke test: `python -m bench.gpu --sizes tiny`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import flops
from bench.__main__ import HEAD_TASKS, ITC_DEFAULTS
from bt_jax import sharding
from bt_jax.config import BridgeTowerConfig, load_preset
from bt_jax.modeling import create_model, layers
from bt_jax.modeling.bridgetower import REMAT_POLICIES
from bt_jax.training.objectives import ObjectiveConfig
from bt_jax.training.optim import OptimizerConfig
from bt_jax.training.step import Trainer

logger = logging.getLogger("bench.gpu")

REPO = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "base", "large")
DEFAULT_BATCH = {"tiny": 4, "base": 32, "large": 16}
# Training runs first because it is the main number, so a run that is cut
# short still returns it.
PROGRAMS = ("train", *HEAD_TASKS)
INFERENCE_KEYS = ("input_ids", "attention_mask", "pixel_values")
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32")
# Dense bf16 tensor-core peak of an H200 SXM in TFLOP/s. Spec sheets list
# 1,979, which assumes 2:4 structured sparsity.
H200_BF16_TFLOPS = 989.0
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
)

# jax 0.10.2 names each jnp.einsum after its spec in the lowered program's
# locations, so these specs find the attention paths. The first is the einsum
# of jax.nn.dot_product_attention's XLA path, and the second that of the
# explicit path with attention dropout in bt_jax/modeling/layers.py.
XLA_ATTENTION_SPEC = "BTNH,BSNH->BNTS"
EXPLICIT_ATTENTION_SPEC = "bqhd,bkhd->bhqk"
CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
ATTENTION_LABELS = {
    "cudnn-fmha": "cuDNN fused attention (a __cudnn$fmha* custom call)",
    "xla-sdpa": "jax.nn.dot_product_attention, lowered by XLA (no fused kernel)",
    "explicit-einsum": "bt-jax's einsum + softmax + attention dropout",
    "unknown": "none of the above found in the program",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings that every program of one run shares."""

    length: int  # text tokens per pair
    steps: int  # timed calls
    warmup: int  # untimed calls before them
    remat: str
    peak_tflops: float
    attention: str | None  # for bt_jax.modeling.layers.attention_implementation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.split("\n\n")[0]
    )

    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=SIZES,
        default=["base", "large"],
        help="model presets in configs/ to run (default: base large, and tiny is "
        "for smoke tests)",
    )

    parser.add_argument(
        "--programs",
        nargs="+",
        choices=PROGRAMS,
        default=list(PROGRAMS),
        help="programs to run per size: the training step and the inference "
        "heads (default: all)",
    )

    parser.add_argument(
        "--batch",
        nargs="+",
        metavar="N|SIZE=N",
        help="image-text pairs per call: one N for every size, or SIZE=N per "
        "size (default: base=32 large=16 tiny=4)",
    )

    parser.add_argument(
        "--length", type=int, default=40, help="text tokens per pair (default 40)"
    )

    parser.add_argument(
        "--steps", type=int, default=10, help="timed calls per program (default 10)"
    )

    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls per program before the timed ones (default 2)",
    )

    parser.add_argument(
        "--remat",
        choices=sorted(REMAT_POLICIES),
        default="none",
        help="per-layer rematerialisation of the training step (default none)",
    )

    parser.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="bfloat16",
        help="jax_default_matmul_precision while tracing, which sets the precision "
        "of float32 matmuls (default bfloat16)",
    )

    parser.add_argument(
        "--attention",
        choices=("auto", "cudnn", "xla"),
        default="auto",
        help="implementation of jax.nn.dot_product_attention: cuDNN's fused kernel "
        "or XLA's lowering; auto is cudnn on a GPU and xla elsewhere",
    )

    parser.add_argument(
        "--no-attention-dropout",
        dest="attention_dropout",
        action="store_false",
        help="set text_config.attention_probs_dropout_prob to 0, so that training "
        "takes jax.nn.dot_product_attention instead of the explicit einsum path",
    )

    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_TFLOPS,
        help="the accelerator's peak in TFLOP/s, the denominator of MFU (default "
        f"{H200_BF16_TFLOPS:g}: the dense bf16 tensor-core peak of an NVIDIA H200 SXM)",
    )

    parser.add_argument(
        "--json",
        type=Path,
        help="also write every number, the device kind, the versions and the flags "
        "to this file",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line, before anything compiles.

    `args.batches` maps each size to its batch size, and `args.configs` each
    size to its model config.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.sizes = list(dict.fromkeys(args.sizes))
    args.programs = [program for program in PROGRAMS if program in args.programs]
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        parser.error(
            f"--peak-tflops must be a positive number, got {args.peak_tflops}; "
            "pass the accelerator's dense bf16 peak in TFLOP/s"
        )
    args.batches = parse_batches(parser, args.batch, args.sizes)
    args.configs = {
        size: load_config(size, attention_dropout=args.attention_dropout)
        for size in args.sizes
    }
    for size, config in args.configs.items():
        longest = config.text_config.max_text_length
        if not 3 <= args.length <= longest:
            parser.error(
                f"--length {args.length} is invalid for {size}: pass 3 to {longest} "
                "tokens (BOS, at least one masked token, EOS; the maximum is set by "
                "the position table)"
            )
    if args.json is not None:
        check_writable(parser, args.json)
    return args


def parse_batches(
    parser: argparse.ArgumentParser, values: list[str] | None, sizes: list[str]
) -> dict[str, int]:
    """Return the batch size of each size from `--batch` values "N" or "SIZE=N"."""
    batches = {size: DEFAULT_BATCH[size] for size in sizes}
    for value in values or ():
        size, _, number = value.rpartition("=")
        if size and size not in sizes:
            parser.error(
                f"--batch {value}: {size!r} is not among --sizes "
                f"{' '.join(sizes)}; name one of those sizes"
            )
        try:
            batch = int(number)
        except ValueError:
            batch = 0
        if batch < 1:
            parser.error(
                f"--batch {value} is invalid: pass a positive integer N for every "
                "size, or SIZE=N such as base=32"
            )
        for name in [size] if size else sizes:
            batches[name] = batch
    return batches


def check_writable(parser: argparse.ArgumentParser, path: Path) -> None:
    """Exit with a usage error unless a file can be written at `path`."""
    if path.is_dir():
        parser.error(f"--json {path} is a folder; pass a file path such as gpu.json")
    folder = path.parent
    if not folder.is_dir():
        parser.error(
            f"--json {path}: the folder {folder} does not exist; create it or pass "
            "a path in an existing, writable folder"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bench-gpu-"):
            pass
    except OSError as err:
        parser.error(
            f"--json {path}: cannot write to the folder {folder} "
            f"({err.strerror or err}); "
            "pass a path in a writable folder"
        )


def load_config(size: str, *, attention_dropout: bool = True) -> BridgeTowerConfig:
    """Load configs/SIZE.py with the ITC head sizes that the training step needs."""
    config = load_preset(REPO / "configs" / f"{size}.py")
    missing = {
        name: value
        for name, value in ITC_DEFAULTS.items()
        if getattr(config, name) is None
    }
    if missing:
        config = config.replace(**missing)
    if not attention_dropout:
        text = dataclasses.replace(config.text_config, attention_probs_dropout_prob=0.0)
        config = config.replace(text_config=text)
    return config


def make_batch(
    config: BridgeTowerConfig, batch: int, length: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Return a random training batch. The inference heads read only its first three keys."""
    text, vision = config.text_config, config.vision_config
    rng = np.random.default_rng(seed)
    shape = (batch, length)
    input_ids = rng.integers(3, text.vocab_size, shape, dtype=np.int32)
    input_ids[:, 0] = text.bos_token_id
    input_ids[:, -1] = text.eos_token_id

    # Mask 15% of the tokens between BOS and EOS, at least one per row.
    inner = length - 2
    chosen = rng.random((batch, inner)) < 0.15
    chosen[np.arange(batch), rng.integers(0, inner, batch)] = True
    selected = np.zeros(shape, bool)
    selected[:, 1:-1] = chosen
    # RoBERTa's <mask> is the last id of its vocabulary (50264 of 50265).
    mask_id = text.vocab_size - 1
    side = vision.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones(shape, np.int32),
        "pixel_values": rng.standard_normal(
            (batch, side, side, vision.num_channels), dtype=np.float32
        ),
        "mlm_input_ids": np.where(selected, mask_id, input_ids).astype(np.int32),
        "mlm_labels": np.where(selected, input_ids, -100).astype(np.int32),
    }


def attention_paths(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> dict:
    """Return which attention implementations one program contains.

    Fused cuDNN kernels appear only after compilation, as custom calls whose
    target names "cudnn" and "fmha" (jax 0.10.2 emits `__cudnn$fmhaSoftmax` and
    its variants). The other two paths are found in the lowered program.
    """
    targets = sorted(
        {
            target
            for target in CUSTOM_CALL_TARGET.findall(compiled.as_text())
            if "cudnn" in target.lower() and "fmha" in target.lower()
        }
    )
    text = lowered.as_text(debug_info=True)
    paths = []
    if targets:
        paths.append("cudnn-fmha")
    if XLA_ATTENTION_SPEC in text:
        paths.append("xla-sdpa")
    if EXPLICIT_ATTENTION_SPEC in text:
        paths.append("explicit-einsum")
    # NOTE: "unknown" also results if a jax release stops naming einsums by
    # their spec in the lowered program's locations.
    return {"paths": paths or ["unknown"], "cudnn_fmha_custom_calls": targets}


def memory_plan(compiled: jax.stages.Compiled) -> dict[str, int | None]:
    """Return the compiled program's buffer sizes in bytes (None where unknown)."""
    stats = compiled.memory_analysis()
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {
        f"{name}_bytes": getattr(stats, f"{name}_size_in_bytes", None)
        for name in fields
    }


def device_memory() -> dict[str, int] | None:
    """Return the first device's allocator statistics, or None where JAX has none.

    `peak_bytes_in_use` is the maximum since the process started, not since
    the last program.
    """
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {key: stats[key] for key in keys if key in stats}


def peak_gib(result: dict) -> str:
    """Return the device's peak memory after a program in GiB, for the table.

    The allocator keeps one peak per process, so a program that stayed below
    an earlier program's peak gets "<=" that peak, an upper bound.
    """
    memory = result.get("device_memory")
    if memory is None:
        return "n/a"
    peak = memory["peak_bytes_in_use"]
    text = _gib(peak)
    raised = peak > (result.get("peak_bytes_in_use_before") or 0)
    return text if raised else f"<={text}"


def time_calls(call: Callable[[], Any], settings: Settings) -> list[float]:
    """Return the seconds of each timed call, which waits for `call`'s result."""
    for _ in range(settings.warmup):
        jax.block_until_ready(call())
    seconds = []
    for _ in range(settings.steps):
        started = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - started)
    return seconds


def summarise(
    program: str,
    batch: int,
    seconds: list[float],
    model_flops: int,
    settings: Settings,
) -> dict:
    """Return the timing, throughput and MFU entries of one program's result."""
    median = statistics.median(seconds)
    achieved = model_flops / median
    return {
        "program": program,
        "batch": batch,
        "length": settings.length,
        "step_seconds": seconds,
        "median_step_seconds": median,
        "examples_per_second": batch / median,
        "model_flops_per_step": model_flops,
        "model_tflops_per_second": achieved / 1e12,
        "mfu": achieved / (settings.peak_tflops * 1e12),
    }


def benchmark_train(config: BridgeTowerConfig, batch: int, settings: Settings) -> dict:
    """Compile and time the bf16 training step on random parameters."""
    mesh = sharding.make_mesh((1, 1, 1))
    trainer = Trainer(
        config,
        ObjectiveConfig(),
        OptimizerConfig(),
        mesh,
        dtype=jnp.bfloat16,
        remat=settings.remat,
    )
    state = trainer.init(jax.random.key(0))
    inputs = trainer.shard_batch(make_batch(config, batch, settings.length))

    started = time.perf_counter()
    lowered = trainer.step.lower(state, inputs)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started

    metrics = {}

    def step() -> dict:
        # The step donates its state, so each call continues from the last one.
        # The metrics include the norm of the updated parameters, so they are
        # ready only after the whole update.
        nonlocal state, metrics
        state, metrics = compiled(state, inputs)
        return metrics

    seconds = time_calls(step, settings)
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss} after the timed steps")
    model_flops = flops.train_step_flops(config.to_dict(), batch, settings.length)
    return {
        **summarise("train", batch, seconds, model_flops, settings),
        "compile_seconds": compile_seconds,
        "loss": loss,
        "memory_plan": memory_plan(compiled),
        "attention": attention_paths(lowered, compiled),
    }


def benchmark_inference(
    config: BridgeTowerConfig, head: str, batch: int, settings: Settings
) -> dict:
    """Compile and time a bf16 forward pass of one head on random parameters."""
    model = create_model(config, head, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    del model

    def logits(state, input_ids, attention_mask, pixel_values):
        model = nnx.merge(graphdef, state)
        return model(input_ids, attention_mask, pixel_values).logits

    arrays = make_batch(config, batch, settings.length)
    arguments = (
        state,
        *(jnp.asarray(arrays[key]) for key in INFERENCE_KEYS),
    )
    started = time.perf_counter()
    lowered = jax.jit(logits).lower(*arguments)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started

    seconds = time_calls(lambda: compiled(*arguments), settings)
    model_flops = flops.forward_flops(config.to_dict(), batch, settings.length, head)
    return {
        **summarise(head, batch, seconds, model_flops, settings),
        "compile_seconds": compile_seconds,
        "memory_plan": memory_plan(compiled),
        "attention": attention_paths(lowered, compiled),
    }


def run_program(
    size: str, program: str, config: BridgeTowerConfig, batch: int, settings: Settings
) -> dict:
    """Benchmark one program. A runtime failure becomes the result's `error`."""
    logger.info("%s %s: batch %d, compiling", size, program, batch)
    before = device_memory()
    try:
        if program == "train":
            result = benchmark_train(config, batch, settings)
        else:
            result = benchmark_inference(config, program, batch, settings)
    except (
        jax.errors.JaxRuntimeError,
        FloatingPointError,
        NotImplementedError,
        RuntimeError,
        ValueError,
    ) as err:
        # Running out of device memory is the usual failure, and an attention
        # implementation the device cannot run another; the other programs
        # still run.
        logger.error("%s %s (batch %d) failed: %s", size, program, batch, err)
        return {"size": size, "program": program, "batch": batch, "error": str(err)}
    result = {
        "size": size,
        "image_size": config.vision_config.image_size,
        **result,
        "device_memory": device_memory(),
        "peak_bytes_in_use_before": before["peak_bytes_in_use"] if before else None,
    }
    logger.info("%s", summary_line(result))
    return result


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def summary_line(result: dict) -> str:
    """Return one log line with a program's main numbers."""
    peak = peak_gib(result)
    if peak != "n/a":
        peak = f"{peak} GiB"
    return (
        f"{result['size']} {result['program']}: compiled in "
        f"{result['compile_seconds']:.1f} s, {result['median_step_seconds'] * 1e3:.1f} "
        f"ms per step, {result['examples_per_second']:.1f} pairs/s, "
        f"MFU {result['mfu']:.1%}, peak memory {peak}, attention "
        f"{'+'.join(result['attention']['paths'])}"
    )


TABLE_COLUMNS = (
    "size",
    "program",
    "batch",
    "compile s",
    "step ms",
    "pairs/s",
    "TFLOP/s",
    "MFU",
    "peak GiB",
    "temp GiB",
    "args GiB",
    "attention",
)


def table_row(result: dict) -> list[str]:
    head = [result["size"], result["program"], str(result["batch"])]
    if "error" in result:
        return [*head, "failed", *[""] * (len(TABLE_COLUMNS) - 4)]
    plan = result["memory_plan"]
    return [
        *head,
        f"{result['compile_seconds']:.1f}",
        f"{result['median_step_seconds'] * 1e3:.2f}",
        f"{result['examples_per_second']:.1f}",
        f"{result['model_tflops_per_second']:.2f}",
        f"{result['mfu']:.1%}",
        peak_gib(result),
        _gib(plan["temp_bytes"]),
        _gib(plan["argument_bytes"]),
        "+".join(result["attention"]["paths"]),
    ]


def format_table(results: list[dict]) -> str:
    """Return the results as an aligned text table with notes on its columns."""
    rows = [list(TABLE_COLUMNS), *(table_row(result) for result in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(
        "step ms: median of the timed calls. peak GiB: the device allocator's "
        "maximum since the process started, '<=' where an earlier program set it "
        "(n/a where JAX reports none). temp and args GiB: the compiled program's "
        "memory plan."
    )
    used = dict.fromkeys(
        path
        for result in results
        for path in result.get("attention", {}).get("paths", ())
    )
    lines.extend(f"{path}: {ATTENTION_LABELS[path]}" for path in used)
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Return the installed versions of JAX's packages, skipping absent ones."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_json(path: Path, document: dict) -> None:
    """Write `document` to `path` through a temporary file, so readers never see half."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if jax.device_count() != 1:
        logger.error(
            "JAX found %d devices, but bench.gpu measures one. Make only one "
            "visible, for example with CUDA_VISIBLE_DEVICES=0",
            jax.device_count(),
        )
        return 1
    device = jax.devices()[0]
    if jax.default_backend() != "gpu":
        logger.warning(
            "the backend is %s, not a GPU: these are not GPU numbers, and MFU "
            "against the GPU's peak means nothing here",
            jax.default_backend(),
        )

    attention = args.attention
    if attention == "cudnn" and jax.default_backend() != "gpu":
        logger.error(
            "--attention cudnn needs an NVIDIA GPU, but the backend is %s; use "
            "--attention auto or xla",
            jax.default_backend(),
        )
        return 2
    if attention == "auto":
        attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    settings = Settings(
        length=args.length,
        steps=args.steps,
        warmup=args.warmup,
        remat=args.remat,
        peak_tflops=args.peak_tflops,
        attention=attention,
    )
    document = {
        "command": [
            "python",
            "-m",
            "bench.gpu",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "complete": False,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "versions": versions(),
        "flags": {
            "sizes": args.sizes,
            "programs": args.programs,
            "batch": args.batches,
            "length": args.length,
            "steps": args.steps,
            "warmup": args.warmup,
            "remat": args.remat,
            "matmul_precision": args.matmul_precision,
            "attention_dropout": args.attention_dropout,
            "attention": attention,
            "peak_tflops": args.peak_tflops,
        },
        "results": [],
    }
    logger.info(
        "device %s (%s), jax %s, matmul precision %s",
        device.device_kind,
        jax.default_backend(),
        jax.__version__,
        args.matmul_precision,
    )

    # Set in a context, not with jax.config.update, so that the caller's setting
    # (a test session's, for example) is back in force after main returns.
    with (
        jax.default_matmul_precision(args.matmul_precision),
        layers.attention_implementation(attention),
    ):
        for size in args.sizes:
            for program in args.programs:
                result = run_program(
                    size, program, args.configs[size], args.batches[size], settings
                )
                document["results"].append(result)
                if args.json is not None:
                    write_json(args.json, document)

    document["complete"] = True
    if args.json is not None:
        write_json(args.json, document)
        logger.info("wrote %s", args.json)
    print(format_table(document["results"]))
    failed = any("error" in result for result in document["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    # Configured here, not in main, so that a caller's logging (pytest's) stays
    # as it was. `force`, because importing orbax through bt_jax lets absl
    # configure the root logger first.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(main())
