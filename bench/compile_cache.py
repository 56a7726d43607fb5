"""Time the train step's compile with an empty and with a filled compilation cache.

    python -m bench.compile_cache [--size base] [--batch 4] [--json PATH]

`python -m train` keeps compiled programs in `WORKDIR/compilation_cache` (JAX's
persistent compilation cache), so a rerun of the same command, such as a
resume after preemption, loads the step instead of compiling it. This program
measures what that saves. It starts two fresh worker processes, one after the
other, that share a new, empty cache directory. Each builds the bench's
`Trainer` (fused MLM + ITM + ITC step, AdamW, remat "dots", mesh (1, 1, 1))
and times `Trainer.compile_step` for a batch of random inputs (text length 40,
the preset's image size). The first worker compiles and fills the cache; the
second should load the step from it. Each worker also counts JAX's cache-hit
events, and the report names the cache's size. Weights are never created, and
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT_LENGTH = 40
HIT_EVENT = "/jax/compilation_cache/cache_hits"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compile_cache", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", choices=("tiny", "base", "large"), default="base")
    parser.add_argument("--batch", type=int, default=4, help="image-text pairs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def worker(size: str, batch: int) -> dict:
    """Build the trainer, compile its step once and return the timings."""
    import jax
    import numpy as np

    from bench.__main__ import missing_itc_sizes
    from bt_jax import sharding
    from bt_jax.config import load_preset
    from bt_jax.training.objectives import ObjectiveConfig
    from bt_jax.training.optim import OptimizerConfig
    from bt_jax.training.step import Trainer

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == HIT_EVENT else None
    )
    # The ITC head sizes the bench's checkpoints get where a preset lacks them.
    config = load_preset(CONFIGS / f"{size}.py").replace(**missing_itc_sizes(size))
    trainer = Trainer(
        config,
        ObjectiveConfig(),
        OptimizerConfig(),
        sharding.make_mesh((1, 1, 1)),
        remat="dots",
    )
    image = config.vision_config.image_size
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.text_config.vocab_size, (batch, TEXT_LENGTH))
    arrays = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((batch, TEXT_LENGTH), np.int32),
        "pixel_values": rng.standard_normal((batch, image, image, 3), np.float32),
        "mlm_input_ids": ids.astype(np.int32),
        "mlm_labels": np.where(rng.random(ids.shape) < 0.15, ids, -100).astype(
            np.int32
        ),
        "record_index": np.arange(batch),
    }
    started = time.perf_counter()
    trainer.compile_step(trainer.shard_batch(arrays))
    return {
        "compile_step_seconds": round(time.perf_counter() - started, 2),
        "cache_hits": len(hits),
    }


def _run_worker(args, cache: Path) -> dict:
    command = [sys.executable, "-m", "bench.compile_cache", "--worker"]
    command += ["--size", args.size, "--batch", str(args.batch)]
    environment = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    result = subprocess.run(
        command,
        env=environment,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"error: the worker failed with status {result.returncode}:\n"
            f"{result.stderr[-3000:]}"
        )
    lines = result.stdout.strip().splitlines()
    try:
        timings = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(
            "error: the worker's last output line is not its JSON timings:\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        ) from None
    timings["process_seconds"] = round(time.perf_counter() - started, 2)
    return timings


def _directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise SystemExit(f"error: --batch must be positive, got {args.batch}.")
    if args.worker:
        print(json.dumps(worker(args.size, args.batch)))
        return 0
    if args.json:
        # Checked before the workers run for minutes.
        from bench.gpu import check_writable

        check_writable(parser, args.json)
    with tempfile.TemporaryDirectory(prefix="bt-jax-cache-") as directory:
        cache = Path(directory) / "compilation_cache"
        print("first process, empty cache ...", file=sys.stderr, flush=True)
        empty = _run_worker(args, cache)
        print("second process, filled cache ...", file=sys.stderr, flush=True)
        filled = _run_worker(args, cache)
        cache_bytes = _directory_bytes(cache)
    results = {
        "size": args.size,
        "batch": args.batch,
        "text_length": TEXT_LENGTH,
        "empty_cache": empty,
        "filled_cache": filled,
        "cache_mib": round(cache_bytes / 2**20, 1),
    }
    print(json.dumps(results, indent=2))
    if not filled["cache_hits"]:
        print(
            "error: the second process loaded nothing from the cache, so the "
            "timings do not show its effect. Check that JAX_ENABLE_COMPILATION_CACHE "
            "is not set to false.",
            file=sys.stderr,
        )
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
