"""Input pipeline throughput: examples per second against grain worker count.

Builds a JSON Lines dataset from copies of the bundled sample photos (about
512 px on the long side, like COCO's 640 px images after JPEG decoding), then
times the full pipeline of `bt_jax.data`: read the record, decode the image,
resize and crop to the model's size, normalise, tokenise, mask and batch.

    python -m bench.data_throughput [--size 288] [--workers 0 1 2 4]

Writes bench/data_throughput.md (table, machine, versions, command) and
bench/data_throughput.png. Numbers are medians over `--repeats` timed runs,
each after a warm-up batch that is not timed (it pays for starting workers).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _make_source(directory: Path, copies: int) -> int:
    """Write `copies` renamed copies of every sample photo with its captions."""
    import json

    from bt_jax.samples import load_samples

    images = directory / "images"
    images.mkdir(parents=True)
    count = 0
    with open(directory / "train.jsonl", "w", encoding="utf-8") as lines:
        for sample in load_samples():
            source = sample.path()
            for copy in range(copies):
                name = f"{copy:03d}_{source.name}"
                shutil.copyfile(source, images / name)
                for caption in sample.captions:
                    lines.write(
                        json.dumps({"image": f"images/{name}", "caption": caption})
                    )
                    lines.write("\n")
                    count += 1
    return count


def _time_pipeline(records, processor, args, workers: int) -> tuple[float, float]:
    """Return (median, spread) of examples per second over the timed runs."""
    from bt_jax.data import PipelineConfig, make_pipeline

    config = PipelineConfig(
        global_batch_size=args.batch_size,
        max_text_length=50,
        worker_count=workers,
        worker_buffer_size=2,
    )
    rates = []
    for repeat in range(args.repeats):
        pipeline = make_pipeline(
            records,
            processor,
            dataclass_replace(config, seed=repeat),
            shard_index=0,
            shard_count=1,
        )
        iterator = iter(pipeline)
        next(iterator)  # warm-up: starts workers and fills their buffers
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        elapsed = time.perf_counter() - start
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        rates.append(args.batches * args.batch_size / elapsed)
    return statistics.median(rates), (max(rates) - min(rates)) / 2


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _plot(rows, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = [row[0] for row in rows]
    rates = [row[1] for row in rows]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(workers, rates, marker="o")
    axis.set_xlabel("grain worker processes (0 = in the main process)")
    axis.set_ylabel("examples / s")
    axis.set_title(f"bt_jax.data pipeline at {size} px")
    axis.set_xticks(workers)
    axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=288, help="image size in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    parser.add_argument("--copies", type=int, default=8, help="copies of each photo")
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder for the report and plot"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from bt_jax.data import build_dataset, open_records
    from bt_jax.processing import (
        BridgeTowerImageProcessor,
        BridgeTowerProcessor,
        train_tokenizer,
    )
    from bt_jax.samples import load_samples

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = _make_source(root / "source", args.copies)
        start = time.perf_counter()
        dataset = build_dataset("jsonl", root / "source", root / "built")
        build_seconds = time.perf_counter() - start
        records = open_records(dataset, "train")
        texts = [caption for sample in load_samples() for caption in sample.captions]
        tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=1000)
        processor = BridgeTowerProcessor(
            BridgeTowerImageProcessor(size={"shortest_edge": args.size}),
            tokenizer,
            max_text_length=50,
        )
        rows = []
        for workers in args.workers:
            rate, spread = _time_pipeline(records, processor, args, workers)
            rows.append((workers, rate, spread))
            print(
                f"workers={workers}: {rate:.1f} examples/s (±{spread:.1f})", flush=True
            )

    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("grain", "tensorflow-datasets", "pillow", "numpy")
    )
    base = rows[0][1]
    lines = [
        "# Input pipeline throughput",
        "",
        f"Command: `python -m bench.data_throughput {' '.join(argv or sys.argv[1:])}`".rstrip()
        + "",
        f"Machine: {_machine()}; Python {platform.python_version()}; {versions}.",
        "",
        f"Dataset: {len(records)} images ({pairs} image-text pairs), copies of the "
        f"bundled sample photos; built in {build_seconds:.1f} s with every image "
        "decoded once to check it.",
        f"Pipeline: {args.size} px crop, text length 50, MLM masking, batch "
        f"{args.batch_size}; median of {args.repeats} runs of {args.batches} batches "
        "after one warm-up batch.",
        "",
        "| workers | examples/s | vs. 0 workers |",
        "|---:|---:|---:|",
    ]
    for workers, rate, spread in rows:
        lines.append(f"| {workers} | {rate:.1f} ± {spread:.1f} | {rate / base:.2f}x |")
    lines += ["", "![throughput](data_throughput.png)", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.md").write_text("\n".join(lines))
    _plot(rows, args.size, args.out / "data_throughput.png")
    print(f"wrote {args.out / 'data_throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
