"""Command line: `python -m convert {to-jax,to-torch,verify,init-random} ...`.

to-jax SRC OUT       Hugging Face PyTorch checkpoint directory, or an original
                     microsoft/BridgeTower Lightning .ckpt -> bt-jax directory
to-torch SRC OUT     bt-jax directory -> Hugging Face directory (config.json,
                     model.safetensors) that transformers' from_pretrained loads
verify SRC           run the PyTorch reference and bt-jax on the same inputs and
                     print every output's and every layer's difference
init-random OUT      write a randomly initialised PyTorch checkpoint of a preset
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

HEADS = ("model", "mlm", "itm", "itc")
MULTI_HEADS = ("mlm", "itm", "itc")
# The fine-tuning heads of bt_jax.config.TASK_HEADS, repeated here so that
# `--help` does not import JAX.
TASK_HEADS = ("vqa", "nlvr2", "snli-ve")


def head_spec(value: str) -> str:
    """Accept a head name or several of mlm, itm and itc joined by "+"."""
    if value in HEADS:
        return value
    names = value.split("+")
    if len(names) < 2 or any(name not in MULTI_HEADS for name in names):
        raise argparse.ArgumentTypeError(
            f"invalid head {value!r}: use one of {', '.join(HEADS)}, or several of "
            "mlm, itm and itc joined by '+', e.g. mlm+itm+itc"
        )
    return value


def to_jax_head_spec(value: str) -> str:
    """Accept what `head_spec` accepts, or a fine-tuning head (vqa, nlvr2, snli-ve)."""
    if value in TASK_HEADS:
        return value
    try:
        return head_spec(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"invalid head {value!r}: use one of {', '.join(HEADS + TASK_HEADS)}, or "
            "several of mlm, itm and itc joined by '+', e.g. mlm+itm+itc"
        ) from None


DTYPES = ("keep", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert BridgeTower checkpoints between PyTorch and bt-jax, and check parity.",
        epilog="Exit status: 0 on success, 1 when verify finds a difference above "
        "--atol, 2 on an error (the message starts with 'error:').",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug details"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_jax = commands.add_parser(
        "to-jax",
        help="PyTorch checkpoint directory or original .ckpt -> bt-jax directory",
    )
    to_jax.add_argument(
        "src",
        help="Hugging Face directory with config.json and weights, or an original "
        "microsoft/BridgeTower Lightning checkpoint (a .ckpt file, or a directory "
        "with exactly one)",
    )
    to_jax.add_argument(
        "out", help="output directory (must not exist unless --overwrite)"
    )
    to_jax.add_argument(
        "--head",
        type=to_jax_head_spec,
        help="head(s) to keep: model, mlm, itm, itc, several joined by '+' "
        "(mlm+itm+itc), or a fine-tuning head (vqa, nlvr2, snli-ve). Default: "
        "every head the checkpoint stores, else config.json's; for a .ckpt, the "
        "heads its loss_names trained",
    )
    to_jax.add_argument(
        "--config",
        help="for a .ckpt: model config to use instead of the checkpoint's "
        "hyper-parameters (required when it has none): a config.json, a checkpoint "
        "directory, or a preset such as configs/base.py",
    )
    to_jax.add_argument(
        "--answers",
        help="for a .ckpt with a VQA head: the answers in label order, as a JSON "
        "list, an object with a 'label2ans' list, an answer-to-label object, or a "
        "bt-jax VQA dataset folder (default: answer_0, answer_1, ...)",
    )
    to_jax.add_argument(
        "--dtype",
        choices=DTYPES,
        default="keep",
        help="parameter dtype to store (default: keep the checkpoint's)",
    )
    to_jax.add_argument(
        "--init-missing-heads",
        action="store_true",
        help="initialise head weights the checkpoint lacks at random instead of failing",
    )
    to_jax.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists"
    )

    to_torch = commands.add_parser(
        "to-torch", help="bt-jax directory -> Hugging Face directory"
    )
    to_torch.add_argument(
        "src", help="directory written by to-jax or bt_jax.save_pretrained"
    )
    to_torch.add_argument(
        "out", help="output directory (must not exist unless --overwrite)"
    )
    to_torch.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists"
    )

    verify = commands.add_parser(
        "verify", help="compare bt-jax with the PyTorch reference"
    )
    verify.add_argument("src", help="Hugging Face directory to run the reference from")
    verify.add_argument(
        "--jax",
        dest="jax_dir",
        help="bt-jax directory to compare (default: convert SRC in memory)",
    )
    verify.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="max absolute difference allowed (default 1e-4; bfloat16 runs need more, "
        "e.g. --dtype bfloat16 --only probabilities --atol 1e-2)",
    )
    verify.add_argument(
        "--json", action="store_true", help="print the report as one JSON object"
    )
    verify.add_argument(
        "--head", choices=HEADS, help="head to run (default: config.json's)"
    )
    verify.add_argument(
        "--batch", type=int, default=3, help="pairs per batch (default 3)"
    )
    verify.add_argument(
        "--text-length",
        type=int,
        default=16,
        help="tokens in the longest text (default 16)",
    )
    verify.add_argument(
        "--image-size",
        type=int,
        help="image side in pixels; other than the model's, positions are interpolated",
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    verify.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bt-jax compute dtype; the reference always runs in float32 (default float32)",
    )
    verify.add_argument(
        "--only",
        help="comma-separated glob patterns of the outputs to compare, "
        "e.g. 'probabilities' or 'logits,hidden.cross.*' (default: all)",
    )

    init = commands.add_parser(
        "init-random",
        help="write a randomly initialised PyTorch checkpoint of a preset",
    )
    init.add_argument(
        "out", help="output directory (must not exist unless --overwrite)"
    )
    init.add_argument(
        "--config", required=True, help="preset file, e.g. configs/base.py"
    )
    init.add_argument(
        "--head",
        type=head_spec,
        default="itm",
        help="head class, or several heads such as mlm+itm+itc stored in one "
        "checkpoint as the hub's bridgetower-large-itm-mlm-itc does (default itm)",
    )
    init.add_argument(
        "--processor",
        action="store_true",
        help="also write preprocessor_config.json and a byte-level BPE tokenizer "
        "trained on the bundled sample captions (needs vocab_size >= 300)",
    )
    init.add_argument(
        "--seed", type=int, default=0, help="torch seed of the initialisation"
    )
    init.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists"
    )
    return parser


def _quiet_background_errors() -> None:
    """Log errors raised in background threads at DEBUG instead of printing them.

    After a failed Orbax read, TensorStore's callbacks can still fire on an
    asyncio loop that is already closed, and the resulting RuntimeError
    tracebacks would interleave with the one-line error message. The main
    thread's own errors are still reported as before.
    """
    logger = logging.getLogger("convert")
    main_thread = threading.main_thread()
    default_excepthook = sys.excepthook

    def thread_hook(args):
        logger.debug(
            "error in background thread %s",
            getattr(args.thread, "name", "?"),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def except_hook(exc_type, exc_value, exc_traceback):
        if threading.current_thread() is main_thread:
            default_excepthook(exc_type, exc_value, exc_traceback)
        else:
            logger.debug(
                "error in a background thread",
                exc_info=(exc_type, exc_value, exc_traceback),
            )

    def unraisable_hook(unraisable):
        logger.debug("ignored error: %s", unraisable.exc_value)

    threading.excepthook = thread_hook
    sys.excepthook = except_hook
    sys.unraisablehook = unraisable_hook


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own stages log at INFO; Orbax and absl log every file operation at INFO,
    # so other libraries are shown from WARNING up unless --verbose is given.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in ("convert", "bt_jax"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if args.verbose else logging.INFO
        )
    _quiet_background_errors()
    # Imported here so that `--help` returns without loading JAX.
    from convert import commands

    try:
        if args.command == "to-jax":
            commands.to_jax(args)
        elif args.command == "to-torch":
            commands.to_torch(args)
        elif args.command == "init-random":
            commands.init_random(args)
        else:
            report = commands.verify(args)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                from convert.verify import format_report

                print(format_report(report))
            return 0 if report["passed"] else 1
    except (OSError, ValueError, ImportError, TypeError) as err:
        logging.getLogger("convert").debug("failure details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else is a bug or an unforeseen library failure
        logging.getLogger("convert").debug("failure details", exc_info=True)
        print(
            f"error: unexpected {type(err).__name__}: {err}. Run again with --verbose for "
            "the traceback.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    status = main()
    if status == 2:
        # After a failed Orbax read, its background threads print "Event loop is
        # closed" tracebacks during interpreter shutdown. Nothing is left to write
        # (outputs are staged and removed on failure), so skip that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
