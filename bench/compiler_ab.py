"""Time `bt_jax.compiler_options()` against XLA's defaults or other options.

    python -m bench.compiler_ab [--rows base-train-b4 base-itm-b8] [--pairs 6]
        [--against '{"xla_cpu_experimental_ynn_fusion_type": ""}']

For each row of `python -m bench` (same random checkpoint, same inputs), it
builds two bt-jax runners in one process: one compiled with bt-jax's CPU
compiler options, the other with XLA's defaults, or with the options that
`--against` gives. After two untimed calls each, it alternates their timed
calls (bt-jax's options first, then the other runner first, and so on), so a
change in the machine's speed during the run affects both alike. It prints the
median and best seconds per call of each and the ratio of the medians, and
checks that both compute the same outputs. It runs on the CPU only, because
bt-jax's options do nothing elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.__main__ import (
    Row,
    _preset_dict,
    make_checkpoint,
    make_inputs,
    missing_itc_sizes,
)
from bench.__main__ import select_rows as select_bench_rows

logger = logging.getLogger("bench.compiler_ab")

DEFAULT_ROWS = ("base-train-b4", "base-itm-b8", "base-itm-b1")
# Choices of library fusions change only how the executables sum, so outputs
# agree to rounding. Other `--against` options may change them more and fail
# this check.
OUTPUT_ATOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compiler_ab", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="rows of `python -m bench`, as names or fnmatch patterns "
        f"(default: {' '.join(DEFAULT_ROWS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny-model rows, for smoke tests"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=6,
        help="timed calls of each executable (default: 6)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the random checkpoints and input arrays, kept and reused "
        "between runs (default: a temporary folder, deleted at the end)",
    )
    parser.add_argument(
        "--against",
        type=_options_json,
        help="compiler options for the second runner as a JSON object, in place of "
        "XLA's defaults, for example YNNPACK for single matmuls only: "
        '\'{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}\'',
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def _options_json(text: str) -> dict[str, str | bool | int | float]:
    """Parse `--against`: a non-empty JSON object of XLA option names and values."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"invalid JSON {text!r} ({error}); pass an object such as "
            '\'{"xla_cpu_experimental_ynn_fusion_type": ""}\''
        ) from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object; pass option names and values in braces"
        )
    if not options:
        raise argparse.ArgumentTypeError(
            "--against {} compiles like XLA's defaults; leave --against out instead"
        )
    for name, value in options.items():
        if not isinstance(value, str | bool | int | float):
            raise argparse.ArgumentTypeError(
                f"option {name!r} has the value {json.dumps(value)}; XLA options "
                "take a string, a number or true/false"
            )
    return options


def select_rows(parser: argparse.ArgumentParser, args) -> list[Row]:
    """Return the rows `--rows` names: by default DEFAULT_ROWS, or with --quick all
    of its rows."""
    if not args.rows and not args.quick:
        args.rows = list(DEFAULT_ROWS)
    return select_bench_rows(parser, args)


def compare_row(row, work_dir: Path, pairs: int, against: dict | None = None) -> dict:
    """Time one row's two runners in alternation and return the summary.

    The second runner compiles with XLA's defaults and is named "defaults" in
    the summary, or with `against` where given and is then named "against".
    """
    import bt_jax.compiler
    from bench.jax_runner import JaxRunner

    checkpoint = make_checkpoint(row.size, work_dir)
    config = {**_preset_dict(row.size), **missing_itc_sizes(row.size)}
    inputs_path = make_inputs(row, config, work_dir / f"{row.name}.npz", seed=0)
    inputs = dict(np.load(inputs_path))

    other = "defaults" if against is None else "against"
    other_label = "XLA's defaults" if against is None else "the --against options"
    runners = {"options": JaxRunner(row.task, str(checkpoint), inputs)}
    outputs = {"options": runners["options"].reference_outputs()}
    # Trainer and JaxRunner call `bt_jax.compiler.compiler_options()` through
    # the module. Replacing it there gives the second runner XLA's defaults or
    # `against`. That includes the outputs that a training row compiles for
    # the check.
    chosen = bt_jax.compiler.compiler_options
    bt_jax.compiler.compiler_options = lambda: (
        None if against is None else dict(against)
    )
    try:
        runners[other] = JaxRunner(row.task, str(checkpoint), inputs)
        outputs[other] = runners[other].reference_outputs()
    finally:
        bt_jax.compiler.compiler_options = chosen

    max_abs = float(np.abs(outputs["options"] - outputs[other]).max())
    if not max_abs <= OUTPUT_ATOL:
        raise ValueError(
            f"{row.name}: the two executables' outputs differ by {max_abs:.3g}, "
            f"above {OUTPUT_ATOL:g}"
        )

    for runner in runners.values():
        runner.call()
        runner.call()
    # Training rows: both states took the same two steps, so their losses agree.
    losses = {name: runner.last_loss for name, runner in runners.items()}
    loss_diff = None
    if losses["options"] is not None:
        loss_diff = abs(losses["options"] - losses[other])
        if not loss_diff <= OUTPUT_ATOL * max(1.0, abs(losses[other])):
            raise ValueError(
                f"{row.name}: after two steps the losses differ: {losses['options']} "
                f"with bt-jax's options, {losses[other]} with {other_label}"
            )
    seconds = {name: [] for name in runners}
    for index in range(pairs):
        order = ("options", other) if index % 2 == 0 else (other, "options")
        for name in order:
            started = time.perf_counter()
            runners[name].call()
            seconds[name].append(time.perf_counter() - started)
        logger.info(
            "%s pair %d/%d: options %.3f s, %s %.3f s",
            row.name,
            index + 1,
            pairs,
            seconds["options"][-1],
            other,
            seconds[other][-1],
        )
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    # False where both choices compile to the same program, as in tiny models.
    texts = [runner.compiled.as_text() for runner in runners.values()]
    hlo_differs = texts[0] != texts[1]
    return {
        "row": row.name,
        "pairs": pairs,
        "median_s": medians,
        "best_s": {name: float(min(values)) for name, values in seconds.items()},
        "seconds": seconds,
        "speedup": medians[other] / medians["options"],
        "options": bt_jax.compiler.compiler_options(),
        "against_options": against,
        "max_abs_diff": max_abs,
        "loss_diff_after_two_steps": loss_diff,
        "hlo_differs": hlo_differs,
        "compile_s": {name: r.compile_seconds for name, r in runners.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    if args.work_dir is not None:
        if args.work_dir.is_file():
            parser.error(f"--work-dir {args.work_dir} is a file; pass a folder")
        try:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"cannot create --work-dir {args.work_dir}: {error}")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        parser.error(
            f"--json {args.json} is a folder or its folder does not exist; "
            "pass a file path in an existing folder"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = select_rows(parser, args)

    import jax

    import bt_jax

    if jax.default_backend() != "cpu":
        parser.error(
            f"the options apply to XLA's CPU backend, but JAX runs on "
            f"{jax.default_backend()}; set JAX_PLATFORMS=cpu"
        )
    options = bt_jax.compiler_options()
    if options is None:
        parser.error(
            "bt_jax.compiler_options() is None here (XLA_FLAGS sets the YNNPACK "
            "fusion flag, or this jaxlib rejected it), so there is nothing to compare"
        )
    if args.against == options:
        parser.error(
            f"--against {json.dumps(args.against)} equals bt-jax's own options, "
            "so both runners would compile the same program"
        )
    if args.against is not None:
        try:
            probe = jax.jit(lambda x: x + 1, compiler_options=args.against)
            probe.lower(np.float32(0)).compile()
        except jax.errors.JaxRuntimeError as error:
            parser.error(
                f"this jaxlib rejected --against {json.dumps(args.against)}: {error}"
            )
    with tempfile.TemporaryDirectory(prefix="bt-jax-compiler-ab-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        results = [compare_row(row, work_dir, args.pairs, args.against) for row in rows]
    other = "defaults" if args.against is None else "against"
    print(f"compiler options: {options}")
    if args.against is not None:
        print(f"against: {json.dumps(args.against)}")
    print(
        f"{'row':24s} {'options s':>10s} {other + ' s':>11s} {'speedup':>8s} "
        f"{'max abs diff':>13s}"
    )
    for result in results:
        print(
            f"{result['row']:24s} {result['median_s']['options']:10.3f} "
            f"{result['median_s'][other]:11.3f} {result['speedup']:8.3f} "
            f"{result['max_abs_diff']:13.2e}"
        )
    print(
        f"Medians of {args.pairs} alternating calls each; speedup is the {other} "
        "runner's median over the options runner's median, so above 1 means "
        "bt-jax's options are faster."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
