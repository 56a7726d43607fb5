"""Input pipeline throughput: examples per second against workers and threads.

Builds a JSON Lines dataset from copies of the bundled sample photos: 102 to
1411 px on the long side, most of them 512 px, where COCO's are 640 px. Then it
times the full pipeline of `bt_jax.data`: read the record, decode the image,
resize and crop to the model's size, normalise, tokenise, mask and batch.

    python -m bench.data_throughput [--size 288] [--settings 0x1 0x2 2x1 ...]

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


def _time_pipeline(
    records, processor, args, workers: int, threads: int
) -> tuple[float, float]:
    """Return (median, spread) of examples per second over the timed runs."""
    from bt_jax.data import PipelineConfig, make_pipeline

    config = PipelineConfig(
        global_batch_size=args.batch_size,
        max_text_length=50,
        worker_count=workers,
        read_threads=threads,
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

    labels = [f"{workers}x{threads}" for workers, threads, _, _ in rows]
    rates = [row[2] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.bar(labels, rates)
    axis.set_xlabel("worker processes x threads per process")
    axis.set_ylabel("examples / s")
    axis.set_title(f"bt_jax.data pipeline at {size} px")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=288, help="image size in pixels")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["0x1", "0x2", "0x4", "1x1", "2x1", "4x1", "2x2"],
        help="WORKERSxTHREADS pairs: grain worker processes, and threads that "
        "prepare examples in each process",
    )
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
        for setting in args.settings:
            workers, threads = (int(part) for part in setting.split("x"))
            rate, spread = _time_pipeline(records, processor, args, workers, threads)
            rows.append((workers, threads, rate, spread))
            print(
                f"workers={workers} threads={threads}: {rate:.1f} examples/s "
                f"(±{spread:.1f})",
                flush=True,
            )

    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("grain", "tensorflow-datasets", "pillow", "numpy")
    )
    command = argv if argv is not None else sys.argv[1:]
    base = rows[0][2]
    lines = [
        "# Input pipeline throughput",
        "",
        "Command: `" + " ".join(["python -m bench.data_throughput", *command]) + "`",
        f"Machine: {_machine()}; Python {platform.python_version()}; {versions}.",
        "",
        f"Dataset: {len(records)} images ({pairs} image-text pairs), copies of the "
        f"bundled sample photos; built in {build_seconds:.1f} s with every image "
        "decoded once to check it.",
        f"Pipeline: {args.size} px crop, text length 50, MLM masking, batch "
        f"{args.batch_size}; median of {args.repeats} runs of {args.batches} batches "
        "after one warm-up batch.",
        "",
        "| worker processes | threads per process | examples/s | vs. first row |",
        "|---:|---:|---:|---:|",
    ]
    for workers, threads, rate, spread in rows:
        lines.append(
            f"| {workers} | {threads} | {rate:.1f} ± {spread:.1f} | {rate / base:.2f}x |"
        )
    lines += [
        "",
        "Threads decode and resize in parallel because PIL and numpy release the "
        "GIL. A worker process sends each prepared example to the main process "
        f"({args.size}x{args.size}x3 float32 pixels, "
        f"{args.size * args.size * 3 * 4 / 2**20:.1f} MiB), which costs time that "
        "threads do not pay. `PipelineConfig(read_threads=...)` and "
        "`worker_count=...` choose the setting; the default uses one thread per "
        "CPU without workers.",
        "",
        "![throughput](data_throughput.png)",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.md").write_text("\n".join(lines))
    _plot(rows, args.size, args.out / "data_throughput.png")
    print(f"wrote {args.out / 'data_throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
