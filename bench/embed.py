"""Embedding job throughput: `bt_jax.embed.run` against the same job in PyTorch.

    python -m bench.embed [--quick] [--pairs N] [--batch-size B] [--rounds N]
        [--size PRESET] [--job-only] [--out DIR]

Both frameworks embed the same JSON Lines file of image-caption records (the
bundled sample photos, `bt_jax.samples.materialize`, repeated to `--pairs`)
with the same random ITC checkpoint, processor and batch size, and write the
joint embeddings as a `.npy`. One measurement, `job`, times the whole job:
reading the records, decoding and preprocessing the images, tokenising,
embedding and writing. Another, `model`, times the model calls alone on the
batches preprocessed in advance (leave it out with `--job-only`).

Each measurement runs in one worker process per framework (`bench.workers`),
so each peak RSS belongs to one framework and one measurement. Each worker
first makes one untimed call (bt-jax compiles in it); the two frameworks'
joint embeddings from that call must agree within `--atol`. Then timed rounds
alternate between the workers, one call each, and the report gives medians.

Writes EMBED_RESULTS.md, embed.png and embed.json to `--out` (default bench/).
`--quick` runs the sample preset (64 px images) on 16 pairs for one round, as
a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.__main__ import compare_outputs, make_checkpoint, missing_itc_sizes
from bench.workers import FRAMEWORKS, REPO, Worker

logger = logging.getLogger("bench.embed")

HERE = Path(__file__).resolve().parent
REPORT_FILE = "EMBED_RESULTS.md"
PLOT_FILE = "embed.png"
JSON_FILE = "embed.json"
FRAMEWORK_NAMES = {"jax": "bt-jax", "torch": "PyTorch"}
MEASUREMENTS = {
    "job": "embedding job",
    "model": "model calls only",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The measurements of one run and their settings."""

    size: str  # a preset in configs/ that `init-random --processor` accepts
    pairs: int
    batch_size: int
    rounds: int
    tasks: tuple[str, ...]  # among MEASUREMENTS
    atol: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.embed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sample preset, 16 pairs, 1 round: a smoke test",
    )
    parser.add_argument(
        "--size",
        help="model preset in configs/ (default base, quick sample); it needs a "
        "vocabulary of at least 300 tokens for the sample tokenizer, so not tiny",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        help="image-caption records in the input file, the sample captions "
        "repeated in order (default 64, quick 16)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="pairs per model call (default 8)"
    )
    parser.add_argument(
        "--rounds", type=int, help="timed rounds per framework (default 3, quick 1)"
    )
    parser.add_argument(
        "--job-only",
        action="store_true",
        help="time only the embedding job, not the model calls alone",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest allowed max abs difference of the joint embeddings "
        "(default 1e-3)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the random checkpoint, the sample photos and the jobs' "
        "output, kept and the checkpoint reused between runs (default: a "
        "temporary folder, deleted at the end)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help=f"folder for {REPORT_FILE}, {PLOT_FILE} and {JSON_FILE} (default bench/)",
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Parse and check the command line, and fill in the defaults of --quick."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("pairs", "batch_size", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.atol <= 0:
        parser.error(f"--atol must be positive, got {args.atol}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder")
    if args.work_dir is not None and args.work_dir.is_file():
        parser.error(f"--work-dir {args.work_dir} is a file; pass a folder")
    size = args.size or ("sample" if args.quick else "base")
    if not (REPO / "configs" / f"{size}.py").is_file():
        parser.error(f"--size {size}: configs/{size}.py not found; pass a preset name")
    settings = Settings(
        size=size,
        pairs=args.pairs or (16 if args.quick else 64),
        batch_size=args.batch_size,
        rounds=args.rounds or (1 if args.quick else 3),
        tasks=("job",) if args.job_only else tuple(MEASUREMENTS),
        atol=args.atol,
    )
    return args, settings


def write_pairs(directory: Path, pairs: int) -> Path:
    """Write the sample photos and a JSON Lines file of `pairs` caption records.

    The sample captions are repeated in order; a repeated record's id gets
    `#copy` appended, so the ids stay unique.
    """
    from bt_jax.samples import materialize

    captions = materialize(directory, overwrite=True)
    with captions.open(encoding="utf-8") as file:
        records = [json.loads(line) for line in file if line.strip()]
    path = directory / f"pairs-{pairs}.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for index in range(pairs):
            record = dict(records[index % len(records)])
            copy = index // len(records)
            if copy:
                record["id"] = f"{record['id']}#{copy}"
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def photo_long_sides(directory: Path) -> list[int]:
    """Return the long side in pixels of each sample photo `write_pairs` copied."""
    import PIL.Image

    sides = []
    for path in sorted((directory / "images").iterdir()):
        with PIL.Image.open(path) as image:  # reads the header only
            sides.append(max(image.size))
    return sides


def token_counts(checkpoint: Path, source: Path) -> list[int]:
    """Return each record's token count with the checkpoint's tokenizer.

    Special tokens are included, and nothing is padded or truncated.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    with source.open(encoding="utf-8") as file:
        texts = [json.loads(line)["caption"] for line in file if line.strip()]
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def measure(
    task: str, checkpoint: Path, source: Path, work_dir: Path, settings: Settings
) -> dict:
    """Run `task` in one worker per framework: check the outputs, then time it."""
    outputs = {name: work_dir / f"{task}.{name}.npy" for name in FRAMEWORKS}
    with (
        Worker("jax", suite="embed") as jax_worker,
        Worker("torch", suite="embed") as torch_worker,
    ):
        workers = {"jax": jax_worker, "torch": torch_worker}
        # One at a time, so that neither loads while the other runs.
        for name, worker in workers.items():
            worker.wait_ready()
            # Emptied first, so that a reused --work-dir contains no finished job
            # that bt_jax.embed.run would resume instead of embedding again.
            folder = work_dir / f"{task}-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            options = {
                "source": str(source),
                "batch_size": settings.batch_size,
                "work_dir": str(folder),
            }
            worker.request(
                "load", task=task, checkpoint=str(checkpoint), options=options
            )

        first_call = {}
        for name, worker in workers.items():
            first_call[name] = worker.request("run", calls=1)["seconds"][0]
            worker.request("outputs", path=str(outputs[name]))
        comparison = compare_outputs(outputs["jax"], outputs["torch"], settings.atol)
        logger.info(
            "%s: first calls took %.1f s (bt-jax, compiling) and %.1f s (PyTorch); "
            "max abs diff %.1e",
            task,
            first_call["jax"],
            first_call["torch"],
            comparison["max_abs_diff"],
        )

        rates = {name: [] for name in workers}
        for round_index in range(settings.rounds):
            for name, worker in workers.items():
                seconds = worker.request("run", calls=1)["seconds"][0]
                rates[name].append(settings.pairs / seconds)
            logger.info(
                "%s round %d: bt-jax %s pairs/s, PyTorch %s pairs/s",
                task,
                round_index + 1,
                _rate(rates["jax"][-1]),
                _rate(rates["torch"][-1]),
            )

        result = {"task": task, **comparison}
        for name, worker in workers.items():
            stats = worker.request("stats")
            result[name] = {
                "pairs_per_second": rates[name],
                "median": statistics.median(rates[name]),
                "first_call_seconds": first_call[name],
                "max_rss_mib": stats["max_rss_mib"],
                "threads": stats["threads"],
                "os_threads": stats["os_threads"],
            }
    result["ratio"] = result["jax"]["median"] / result["torch"]["median"]
    return result


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    command = ["python", "-m", "bench.embed", *(sys.argv[1:] if argv is None else argv)]
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            checkpoint = make_checkpoint(
                settings.size, work_dir, head="itc", processor=True
            )
            source = write_pairs(work_dir / "samples", settings.pairs)
            config = json.loads((checkpoint / "config.json").read_text("utf-8"))
            tokens = token_counts(checkpoint, source)
            sides = photo_long_sides(source.parent)
            results = []
            for task in settings.tasks:
                results.append(
                    measure(task, checkpoint, source, work_dir / "runs", settings)
                )
        except (RuntimeError, ValueError) as err:  # WorkerError is a RuntimeError
            logger.error("%s", err)
            return 1

    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(command),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": report.machine(),
        "versions": report.versions(),
        "load_average": [load_before, os.getloadavg()[0]],
        "settings": dataclasses.asdict(settings),
        "image_size": config["vision_config"]["image_size"],
        "contrastive_hidden_size": config["contrastive_hidden_size"],
        "itc_defaults": missing_itc_sizes(settings.size),
        "photos": {
            "count": len(sides),
            "long_side_min": min(sides),
            "long_side_max": max(sides),
            "long_side_median": statistics.median(sides),
        },
        "tokens": {
            "min": min(tokens),
            "max": max(tokens),
            "mean": round(statistics.mean(tokens), 1),
        },
        "measurements": results,
    }
    paths = write(document, args.out)
    print(table(document))
    logger.info("wrote %s", ", ".join(str(path) for path in paths))
    return 0


# ------------------------------------------------------------------ the report


def table(document: dict) -> str:
    """Return the Markdown table with one line per measurement."""
    lines = [
        "| measurement | bt-jax pairs/s | PyTorch pairs/s | ratio "
        "| bt-jax first call s | PyTorch first call s "
        "| peak RSS bt-jax MiB | peak RSS PyTorch MiB | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in document["measurements"]:
        jax, torch = result["jax"], result["torch"]
        lines.append(
            f"| {MEASUREMENTS[result['task']]} | {_rate(jax['median'])} "
            f"| {_rate(torch['median'])} | {result['ratio']:.2f} "
            f"| {jax['first_call_seconds']:.1f} | {torch['first_call_seconds']:.1f} "
            f"| {jax['max_rss_mib']:.0f} | {torch['max_rss_mib']:.0f} "
            f"| {result['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def _rate(pairs_per_second: float) -> str:
    """Format a rate with 3 significant digits, without an exponent up to 10^5."""
    if pairs_per_second >= 100:
        return f"{pairs_per_second:.0f}"
    return f"{pairs_per_second:.3g}"


def _rounds_lines(document: dict) -> list[str]:
    """Return one line per measurement with the pairs/s of every timed round."""
    lines = []
    for result in document["measurements"]:
        rates = {
            name: ", ".join(_rate(rate) for rate in result[name]["pairs_per_second"])
            for name in FRAMEWORKS
        }
        lines.append(
            f"- {MEASUREMENTS[result['task']]}: bt-jax {rates['jax']}; "
            f"PyTorch {rates['torch']}"
        )
    return ["Timed rounds, pairs/s in order:", "", *lines, ""]


def _columns_paragraph(document: dict) -> str:
    """Return the paragraph that defines the table's columns."""
    settings = document["settings"]
    rounds = settings["rounds"]
    return (
        f"Throughputs are image-text pairs per second: the {settings['pairs']} "
        "pairs of the input file divided by the wall time of one call, the "
        f"median of {rounds} timed {'round' if rounds == 1 else 'rounds'} per "
        "framework. The rounds alternate between the two frameworks' worker "
        "processes (bt-jax, PyTorch, bt-jax, ...). Ratio is bt-jax / PyTorch, so "
        "above 1 means bt-jax is faster. Each worker's first call is not one of "
        "the rounds. Its time is in the first-call columns, and bt-jax compiles "
        "in it (one function per batch shape). Loading the checkpoint is timed "
        "in neither. Peak RSS is `ru_maxrss` of each worker process, which made "
        "one measurement only: loading, the first call and the rounds. Max abs "
        "diff compares the two frameworks' joint embeddings (L2-normalised, "
        "float32) from the first call, before timing, and the run fails above "
        f"{settings['atol']:.0e}."
    )


def _measurement_lines(document: dict) -> list[str]:
    """Return the list that describes the calls of each measurement."""
    settings = document["settings"]
    batch = settings["batch_size"]
    lines = [
        "Measurements:",
        "",
        f"- `embedding job`: each call embeds the whole file in batches of "
        f"{batch} and writes `joint.npy` into a new folder. bt-jax runs "
        '`bt_jax.embed.run(embedder, open_source(FILE), OUT, kinds="joint", '
        "progress=False)` with `Embedder.from_pretrained(CHECKPOINT, "
        f"batch_size={batch})`, the job behind `python -m bt_jax.embed run`. It "
        "reads the records, decodes and preprocesses the images in 4 threads "
        "while the model runs, tokenises, pads each batch's texts to a power of "
        "two of at least 16 tokens, embeds, and writes `joint.npy`, `ids.jsonl` "
        "and `manifest.json`. PyTorch runs the same job as a transformers user "
        "would write it (`bench/torch_embed_runner.py`): `json.loads` on each "
        "line, `transformers.image_utils.load_image` on each image in the "
        "calling thread, `BridgeTowerProcessor` (texts padded to the longest of "
        "the batch), `BridgeTowerForContrastiveLearning` in eval mode under "
        "`torch.no_grad()`, and its `cross_embeds` saved as one `joint.npy`.",
    ]
    if "model" in settings["tasks"]:
        lines.append(
            "- `model calls only`: the same batches, preprocessed before timing by "
            "each framework's job code (bt-jax: `Embedder.tokens` and "
            "`Embedder.pixels`, PyTorch: `BridgeTowerProcessor`), then embedded "
            "one batch after the other: `Embedder.submit` and `collect` for "
            "bt-jax, the model's forward for PyTorch. These workers also keep "
            "every preprocessed batch in memory, which their peak RSS includes."
        )
    return [*lines, ""]


def _input_paragraph(document: dict) -> str:
    """Return the paragraph on the input file, the photos and the checkpoint."""
    settings = document["settings"]
    size, image_size = settings["size"], document["image_size"]
    tokens, photos = document["tokens"], document["photos"]
    paragraph = (
        f"Input: {settings['pairs']} records from `bt_jax.samples.materialize`, "
        "the sample captions repeated in order, in one JSON Lines file that both "
        f"frameworks read. The images are the {photos['count']} bundled sample "
        f"photos (scikit-image's data folder, {photos['long_side_min']} to "
        f"{photos['long_side_max']} px on the long side, median "
        f"{photos['long_side_median']:g} px), decoded from their files in every "
        f"call and resized and cropped to {image_size} px. Both frameworks load "
        "the same random checkpoint, written by `python -m convert init-random "
        f"--head itc --processor` from configs/{size}.py. `--processor` also "
        f"writes the {image_size} px `preprocessor_config.json` and a byte-level "
        "BPE tokenizer trained on the sample captions, which both frameworks "
        f"load. With it, a caption is {tokens['min']} to {tokens['max']} tokens "
        f"long ({tokens['mean']} on average, `<s>` and `</s>` included)."
    )
    defaults = document["itc_defaults"]
    if defaults:
        paragraph += (
            f" configs/{size}.py lacks the ITC head sizes, so the checkpoint gets "
            "those of the released bridgetower-large-itm-mlm-itc: "
            + ", ".join(f"{key} {value}" for key, value in defaults.items())
            + "."
        )
    return paragraph


def _machine_lines(document: dict) -> list[str]:
    info = document["machine"]
    found = document["versions"]
    last = document["measurements"][-1]
    threads = {
        name: ", ".join(f"{k} {v}" for k, v in last[name]["threads"].items())
        for name in FRAMEWORKS
    }
    return [
        "Machine:",
        "",
        f"- CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs "
        f"({info['schedulable_cpus']} schedulable), {info['memory_gib']} GiB "
        f"memory, {info['system']}",
        "- versions: " + ", ".join(f"{name} {found[name]}" for name in found),
        f"- threads: PyTorch {threads['torch']}; bt-jax {threads['jax']}",
        "- 1-minute load average at the start and the end of the run: "
        f"{document['load_average'][0]:.2f}, {document['load_average'][1]:.2f}. "
        "The value at the end includes this benchmark's own workers. Other "
        "processes on the same cores distort the timings, so compare only runs "
        "made on an idle machine.",
        "",
    ]


def markdown(document: dict) -> str:
    lines = [
        "# Embedding job: bt-jax against PyTorch (transformers) on the CPU",
        "",
        f"Command: `{document['command']}` (from the repository root), finished "
        f"on {document['date']}, {document['seconds']:.0f} s in all.",
        "",
        table(document),
        "",
        *_rounds_lines(document),
        _columns_paragraph(document),
        "",
        *_measurement_lines(document),
        _input_paragraph(document),
        "",
        *_machine_lines(document),
        f"![pairs per second, bt-jax and PyTorch]({PLOT_FILE})",
        "",
    ]
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    """Draw pairs/s per framework as bars, grouped by measurement, with the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["measurements"]
    width = 0.38
    figure, axis = plt.subplots(figsize=(2.2 + 2.2 * len(results), 3.6))
    for offset, (name, color) in zip(
        (-width / 2, width / 2),
        (("jax", "tab:blue"), ("torch", "tab:orange")),
        strict=True,
    ):
        positions = [index + offset for index in range(len(results))]
        rates = [result[name]["median"] for result in results]
        bars = axis.bar(
            positions, rates, width, color=color, label=FRAMEWORK_NAMES[name]
        )
        axis.bar_label(bars, labels=[_rate(rate) for rate in rates], fontsize=8)
    axis.set_xticks(
        range(len(results)),
        [
            f"{MEASUREMENTS[result['task']]}\nbt-jax / PyTorch {result['ratio']:.2f}"
            for result in results
        ],
        fontsize=8,
    )
    axis.set_ylabel("pairs / s")
    axis.margins(y=0.15)
    axis.legend(fontsize=8)
    settings = document["settings"]
    axis.set_title(
        f"{settings['size']} model, batch {settings['batch_size']}, "
        f"{document['image_size']} px, on {document['machine']['cpu']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(document: dict, out: Path) -> list[Path]:
    """Write the Markdown report, the plot and the JSON document into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / REPORT_FILE, out / PLOT_FILE, out / JSON_FILE]
    paths[0].write_text(markdown(document), encoding="utf-8")
    plot(document, paths[1])
    paths[2].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":
    sys.exit(main())
