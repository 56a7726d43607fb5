"""Estimate a training config's memory per device before running it.

    python -m train.memory --config configs/pretrain_base.py [--devices 8]
        [--config.mesh_shape=(2,4,1) --config.global_batch_size=64 ...]

The program builds the train step for the config's mesh and compiles it ahead
of time on abstract inputs, so no parameter is allocated. It then prints the
bytes on each device: parameters and optimizer state (from their shardings), the
batch, and the step's temporaries (from XLA's memory analysis of the step).
`--devices N` simulates N CPU devices, so a mesh for a pod can be checked on a
laptop. Temporaries depend on the backend's compiler: numbers from the CPU
backend show the layout and the order of magnitude, not a GPU or TPU's exact
peak.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py).", lock_config=True
)
_DEVICES = flags.DEFINE_integer(
    "devices",
    0,
    "Simulate this many CPU devices (sets XLA_FLAGS before JAX starts); 0 uses "
    "the devices present.",
    lower_bound=0,
)
_JSON = flags.DEFINE_string("json", "", "Also write the estimate to this JSON file.")
_COMPILE = flags.DEFINE_boolean(
    "compile",
    True,
    "Compile the step to measure its temporaries; --nocompile reports only the "
    "parameters, optimizer state and batch, and takes seconds instead of minutes.",
)

logger = logging.getLogger("train.memory")

GIB = 2**30


def _sharded_bytes(tree, shardings) -> int:
    """Return the bytes of `tree` on the device with the largest share of it."""
    import jax

    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True
    ):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def abstract_batch(config, model_config, mesh):
    """Return `ShapeDtypeStruct`s of one global training batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from bt_jax.training.step import BATCH_AXES

    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    size = config.global_batch_size
    image = model_config.vision_config.image_size
    length = config.data.max_text_length
    shapes = {
        "pixel_values": ((size, image, image, 3), jnp.float32),
        "input_ids": ((size, length), jnp.int32),
        "attention_mask": ((size, length), jnp.int32),
        "record_index": ((size,), jnp.int32),
    }
    if config.task == "pretrain" and config.objective.mlm_weight:
        shapes["mlm_input_ids"] = ((size, length), jnp.int32)
        shapes["mlm_labels"] = ((size, length), jnp.int32)
    if config.task == "vqa":
        shapes["vqa_targets"] = ((size, model_config.num_labels), jnp.float32)
    if config.task in ("nlvr2", "snli-ve"):
        shapes["labels"] = ((size,), jnp.int32)
    if config.task == "nlvr2":
        shapes["pixel_values_2"] = shapes["pixel_values"]
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for name, (shape, dtype) in shapes.items()
    }


def estimate(config, *, compile_step: bool = True) -> dict:
    """Return bytes per device of `config`'s train step.

    With `compile_step`, the step is compiled ahead of time and XLA's memory
    analysis gives its temporaries; without, temporaries are None.
    """
    import jax

    from bt_jax.training.settings import RunSettings
    from train import setup

    settings = RunSettings.from_config(config, needs_data=False)
    mesh = setup.make_mesh(config.mesh_shape)
    setup.check_batch(config, mesh)
    model_config = setup.load_model_config(config, setup.heads_of(config, settings))
    model_config = setup.task_model_config(config, model_config, None)
    trainer = setup.make_trainer(config, settings, model_config, mesh)
    state = trainer.abstract_state()
    batch = abstract_batch(config, model_config, mesh)
    analysis, compile_seconds = None, None
    if compile_step:
        started = time.perf_counter()
        compiled = trainer.step.lower(state, batch).compile()
        compile_seconds = round(time.perf_counter() - started, 1)
        analysis = compiled.memory_analysis()
    params = _sharded_bytes(state.params, trainer.state_shardings.params)
    optimizer = _sharded_bytes(state.opt_state, trainer.state_shardings.opt_state)
    batch_bytes = _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch))
    temporaries = int(analysis.temp_size_in_bytes) if analysis else None
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
    result = {
        "model": config.model or config.init_from,
        "parameters": count,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "mesh": dict(mesh.shape),
        "global_batch_size": config.global_batch_size,
        "accumulation_steps": config.accumulation_steps,
        "examples_per_shard": config.global_batch_size
        // (mesh.shape["data"] * mesh.shape["fsdp"] * config.accumulation_steps),
        "dtype": config.dtype,
        "remat": config.remat,
        "params_bytes": params,
        "optimizer_bytes": optimizer,
        "batch_bytes": batch_bytes,
        "temporary_bytes": temporaries,
        "compile_seconds": compile_seconds,
    }
    result["total_bytes"] = params + optimizer + batch_bytes + (temporaries or 0)
    return result


def format_estimate(result: dict) -> str:
    def gib(value):
        if value is None:
            return f"{'n/a':>13}"
        if value < GIB:
            return f"{value / 2**20:9.1f} MiB"
        return f"{value / GIB:9.2f} GiB"

    lines = [
        f"model {result['model']} ({result['parameters']:,} parameters), "
        f"{_count(result['devices'], result['platform'] + ' device')}, "
        f"mesh {result['mesh']}",
        f"global batch {result['global_batch_size']} in "
        f"{_count(result['accumulation_steps'], 'microbatch', 'microbatches')}, "
        f"{result['examples_per_shard']} examples per batch shard per microbatch, "
        f"dtype {result['dtype']}, remat {result['remat']}; "
        + (
            f"compiled in {result['compile_seconds']} s"
            if result["compile_seconds"] is not None
            else "not compiled (--nocompile), so temporaries are not counted"
        ),
        "per device:",
        f"  parameters       {gib(result['params_bytes'])}",
        f"  optimizer state  {gib(result['optimizer_bytes'])}",
        f"  batch            {gib(result['batch_bytes'])}",
        f"  temporaries      {gib(result['temporary_bytes'])}",
        f"  total            {gib(result['total_bytes'])}"
        + ("" if result["temporary_bytes"] is not None else " without temporaries"),
    ]
    return "\n".join(lines)


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _check_writable(path: str) -> None:
    """Raise OSError now if `path` cannot be written, before minutes of compiling."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"--json {path}: directory {parent} does not exist; create it or pick another path."
        )
    if not os.access(parent, os.W_OK):
        raise PermissionError(
            f"--json {path}: directory {parent} is not writable; pick another path."
        )


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required.")
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if _JSON.value:
            _check_writable(_JSON.value)
        result = estimate(_CONFIG.value, compile_step=_COMPILE.value)
    except (ValueError, OSError) as error:
        logger.error("error: %s", error)
        return 2
    print(format_estimate(result))
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
    return 0


def _simulate_devices(argv: list[str]) -> None:
    # XLA reads the device count once, when JAX starts, so it is set from argv
    # before anything imports JAX.
    for index, arg in enumerate(argv):
        value = None
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--devices" and index + 1 < len(argv):
            value = argv[index + 1]
        if value and value.isdigit() and int(value) > 0:
            os.environ["JAX_PLATFORMS"] = "cpu"
            # The simulated step is only compiled, never run, so LLVM's code
            # optimisation is skipped. Buffer sizes come from the HLO passes,
            # which these flags leave alone.
            flags = (
                f"--xla_force_host_platform_device_count={int(value)} "
                "--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true"
            )
            os.environ["XLA_FLAGS"] = (
                f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
            )


if __name__ == "__main__":
    _simulate_devices(sys.argv)
    from train.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
