"""Command line: `python -m bt_jax.data {build,samples,stats} ...`.

build FORMAT SOURCE --out DIR   build an ArrayRecord dataset from local files
                                and print its statistics
samples OUT                     build the bundled sample photos and captions
                                (split train) into OUT and print its statistics
stats DATASET                   print the statistics of a built dataset

Formats and the source layouts they read:
  coco      annotations/captions_{split}{year}.json + {split}{year}/ images
  karpathy  dataset_coco.json or dataset_flickr30k.json + the image folders
  jsonl     SPLIT.jsonl files of {"image": path, "caption": text} lines
  vqa       v2_OpenEnded_mscoco_{split}2014_questions.json,
            v2_mscoco_{split}2014_annotations.json + {split}2014/ images
  nlvr2     nlvr2/data/{train,dev,test1}.json + images/train/{directory}/,
            dev/ and test1/ (or images/dev/, images/test1/) image pairs
  snli-ve   snli_ve_{train,dev,test}.jsonl + flickr30k_images/ (or
            Flickr30K/flickr30k_images/, flickr30k-images/, images/)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from bt_jax.data import builders, vqa


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bt_jax.data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build a dataset from local files")
    build.add_argument("format", choices=sorted(builders.BUILDERS))
    build.add_argument("source", type=Path, help="folder in the format's layout")
    build.add_argument(
        "--out", type=Path, required=True, help="TFDS data folder to write into"
    )
    build.add_argument("--overwrite", action="store_true", help="rebuild if present")
    build.add_argument(
        "--no-verify-images",
        dest="verify_images",
        action="store_false",
        help="only check that image files exist and are not empty (faster; "
        "corrupt images are then skipped while training)",
    )
    build.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="image-reading threads (default: CPUs)",
    )
    build.add_argument(
        "--answer-vocab",
        type=Path,
        help="vqa: answers in label order, from a JSON list, a model's config.json "
        "or folder, or a built VQA dataset (default: built from the train and val "
        "annotations)",
    )
    build.add_argument(
        "--min-answer-count",
        type=positive_int,
        default=9,
        help="vqa: how often an answer must occur to enter a built vocabulary",
    )
    _add_stats_options(build)

    samples = commands.add_parser(
        "samples", help="build the bundled sample photos and captions as a dataset"
    )
    samples.add_argument(
        "out", type=Path, help="folder for the source files and the dataset"
    )
    samples.add_argument("--overwrite", action="store_true", help="rebuild if present")
    _add_stats_options(samples)

    stats = commands.add_parser("stats", help="print a built dataset's statistics")
    stats.add_argument("dataset", type=Path, help="built dataset folder")
    _add_stats_options(stats)
    return parser


def _add_stats_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="checkpoint or tokenizer folder; text lengths are counted in its "
        "tokens (default: in words)",
    )
    parser.add_argument(
        "--max-text-length",
        type=positive_int,
        default=50,
        help="token limit used in training; the share of longer texts is reported",
    )


def _load_answer_vocab(path: Path) -> list[str]:
    return vqa.read_answer_list(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    # TFDS and absl log every file they write; keep the output to bt-jax's notes.
    logging.getLogger("absl").setLevel(logging.WARNING)

    import tensorflow_datasets as tfds
    from tqdm.contrib.logging import logging_redirect_tqdm

    from bt_jax.data.build import (
        build_dataset,
        build_sample_dataset,
        dataset_statistics,
        format_statistics,
    )
    from bt_jax.processing import load_tokenizer

    # bt-jax shows its own progress bar per split.
    tfds.disable_progress_bar()
    # SIGTERM (from kill or a job scheduler) unwinds like Ctrl-C, so an
    # interrupted rebuild puts the previous dataset back.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with logging_redirect_tqdm():
            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
            if args.command == "build":
                vocab = (
                    _load_answer_vocab(args.answer_vocab) if args.answer_vocab else None
                )
                dataset = build_dataset(
                    args.format,
                    args.source,
                    args.out,
                    overwrite=args.overwrite,
                    verify_images=args.verify_images,
                    num_threads=args.threads,
                    answer_vocab=vocab,
                    min_answer_count=args.min_answer_count,
                )
            elif args.command == "samples":
                dataset = build_sample_dataset(args.out, overwrite=args.overwrite)
            else:
                dataset = args.dataset
            stats = dataset_statistics(
                dataset,
                tokenizer=tokenizer,
                max_text_length=args.max_text_length if tokenizer else None,
            )
    except (ValueError, OSError) as err:
        # OSError covers missing files and folders, and an --out that is a file.
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_statistics(stats))
    if tokenizer is None:
        print("(lengths in words; pass --tokenizer CHECKPOINT for token lengths)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
