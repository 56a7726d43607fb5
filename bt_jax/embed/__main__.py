"""Embed image-text records, search the result, and plot it.

    python -m bt_jax.embed run MODEL INPUT OUT [--kinds joint,text,image]
        [--dtype float16] [--batch-size 32] [--shard-size 1024] [--overwrite]
    python -m bt_jax.embed search OUT "a cat on a sofa" [-k 5] [--kind joint]
    python -m bt_jax.embed plot OUT map.png [--label label] [--method pca]

`run` may be left out: `python -m bt_jax.embed MODEL INPUT OUT` runs it.

INPUT is a folder of images (captions in `NAME.txt` beside each image) or a
JSON Lines file of `{"image": ..., "text": ..., "id": ...}` records; see
`bt_jax.embed.records`. Records that cannot be embedded (a missing or
unreadable image, an empty caption, a broken line) are skipped and counted,
and `OUT/skipped.jsonl` lists them. The job still finishes. Stop the job at any
time (Ctrl-C); the same command resumes it, redoing only the unfinished shard.

Exit status: 0 done, 1 bad input or settings, 2 bad arguments, 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

COMMANDS = ("run", "search", "plot")
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bt_jax.embed",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="embed a folder or JSON Lines file")
    run.add_argument("model", help="checkpoint directory with the ITC head")
    run.add_argument("input", type=Path, help="folder of images or JSON Lines file")
    run.add_argument("out", type=Path, help="output folder (resumed if it exists)")
    run.add_argument(
        "--kinds",
        default="joint",
        help="embeddings to write, comma-separated among joint, text, image "
        "(default: joint)",
    )
    run.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="dtype of the stored embeddings (default: float32)",
    )
    run.add_argument(
        "--compute-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the model's matmuls (default: float32)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="pairs per model call; rounded up to a multiple of the devices "
        "(default: 32)",
    )
    run.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="records per shard, the unit of resumption (default: 1024)",
    )
    run.add_argument("--workers", type=int, default=4, help="image decoding threads")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the embedding job in OUT and start again (a folder that is "
        "not an embedding job's output is never deleted)",
    )
    run.add_argument(
        "--keep-shards",
        action="store_true",
        help="keep OUT/shards/ after joining the shards into the final files",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    search = commands.add_parser("search", help="exact cosine search with text")
    search.add_argument("out", type=Path, help="a finished job's output folder")
    search.add_argument("queries", nargs="+", help="query texts")
    search.add_argument("-k", type=int, default=5, help="results per query")
    search.add_argument("--kind", help="embeddings to search (default: the first)")
    search.add_argument(
        "--model", help="checkpoint to embed the queries with (default: the job's)"
    )
    search.add_argument("--json", action="store_true", help="print JSON lines")

    plot = commands.add_parser("plot", help="2-D projection as an image")
    plot.add_argument("out", type=Path, help="a finished job's output folder")
    plot.add_argument("image", type=Path, help="file to write, such as map.png")
    plot.add_argument("--kind", help="embeddings to plot (default: the first)")
    plot.add_argument("--label", help="ids.jsonl field to colour by")
    plot.add_argument("--method", default="auto", choices=("auto", "umap", "pca"))
    plot.add_argument("--max-points", type=int, default=20_000)
    return parser


def _run(args) -> int:
    import jax.numpy as jnp

    from bt_jax.embed import job
    from bt_jax.embed.embedder import Embedder
    from bt_jax.embed.records import open_source

    source = open_source(args.input)
    embedder = Embedder.from_pretrained(
        args.model,
        compute_dtype=jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    result = job.run(
        embedder,
        source,
        args.out,
        kinds=args.kinds,
        shard_size=args.shard_size,
        model=str(Path(args.model).resolve()),
        overwrite=args.overwrite,
        keep_shards=args.keep_shards,
        progress=not args.no_progress,
        workers=args.workers,
    )
    # job.run logs the summary; a job that embedded nothing is a failure.
    return 0 if result.embedded or not result.total else 1


def _search(args) -> int:
    from bt_jax.embed.embedder import Embedder
    from bt_jax.embed.search import EmbeddingStore

    store = EmbeddingStore(args.out)
    store.vectors(args.kind)  # checks the kind before the model loads
    model = args.model or store.model
    if not model:
        raise ValueError(
            f"{args.out} does not name its model; pass --model with the checkpoint "
            "that embedded it."
        )
    if not Path(model).is_dir():
        raise FileNotFoundError(
            f"the checkpoint {model} that embedded {args.out} is not found; pass "
            "--model with its new location."
        )
    embedder = Embedder.from_pretrained(model, batch_size=8)
    if embedder.fingerprint() != store.manifest["settings"].get("model_fingerprint"):
        logging.warning(
            "%s is not the model that embedded %s (its weights, config or tokenizer "
            "differ), so the scores may be meaningless",
            model,
            args.out,
        )
    queries = embedder.embed_texts(args.queries)
    results = store.search(queries, k=args.k, kind=args.kind)
    for query, hits in zip(args.queries, results, strict=True):
        if args.json:
            for rank, hit in enumerate(hits, start=1):
                row = {
                    "query": query,
                    "rank": rank,
                    "row": hit.index,
                    "score": hit.score,
                }
                print(json.dumps({**row, "record": hit.record}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for rank, hit in enumerate(hits, start=1):
            text = hit.record.get("text") or hit.record.get("image") or ""
            print(f"  {rank:2}. {hit.score:+.4f}  {hit.id}  {text}")
    return 0


def _plot(args) -> int:
    from bt_jax.embed.plot import plot_store

    path = plot_store(
        args.out,
        args.image,
        kind=args.kind,
        label=args.label,
        method=args.method,
        max_points=args.max_points,
    )
    print(f"wrote {path}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    # An imported library has installed a root handler already; replace it.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for name in ("absl", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    command = {"run": _run, "search": _search, "plot": _plot}[args.command]
    try:
        with logging_redirect_tqdm():
            return command(args)
    except KeyboardInterrupt:
        print(
            "interrupted; finished shards are kept. Run the same command again to "
            "resume.",
            file=sys.stderr,
        )
        # XLA may be compiling in another thread, and a normal interpreter exit
        # then crashes, so exit at once. Every finished file is already in place.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
