"""bt-jax against transformers' PyTorch BridgeTower: same weights, inputs and machine.

    python -m bench [--quick] [--rows PATTERN ...] [--rounds N] [--out DIR]

For each row, one bt-jax worker process and one PyTorch worker process load
the same random checkpoint (`python -m convert init-random`) and the same
input arrays. Before timing, the row's outputs of both are compared. After
warm-up calls (bt-jax compiles before them), timed rounds alternate between
the two workers (bt-jax, PyTorch, bt-jax, ...), and the report gives the
median of the rounds. Training rows run the frameworks one after the other
instead, because both processes together need more than 24 GiB. One process
per framework and row means that each peak RSS belongs to that row alone.

Writes RESULTS.md, results.png and results.json to `--out` (default bench/).
`--quick` runs every kind of row on the tiny model, for CI: about 90 s on
2 CPU cores, half of it compiling bt-jax's train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import flops, report
from bench.workers import FRAMEWORKS, REPO, WORKER_ENVIRONMENT, Worker, WorkerError

logger = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
HEAD_TASKS = ("itm", "itc", "mlm")
# ITC head sizes of the released bridgetower-large-itm-mlm-itc config.json, for
# presets without them (configs/base.py), as `python -m train` fills them in.
ITC_DEFAULTS = {"contrastive_hidden_size": 512, "logit_scale_init_value": 2.6592}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: a task on one model size at one batch size."""

    size: str  # a preset in configs/, such as "base"
    # "itm", "itc", "mlm" (inference), "train" (the step, images encoded once)
    # or "train-separate" (images encoded in every pass, as the original recipe)
    task: str
    batch: int
    length: int  # text tokens per pair

    @property
    def name(self) -> str:
        return f"{self.size}-{self.task}-b{self.batch}"


FULL_ROWS = (
    *(
        Row(size, task, batch, 40)
        for size, batches in (("base", (1, 8)), ("large", (1, 4)))
        for task in HEAD_TASKS
        for batch in batches
    ),
    Row("base", "train", 4, 40),
    Row("base", "train-separate", 4, 40),
)
QUICK_ROWS = (
    *(Row("tiny", task, 2, 16) for task in HEAD_TASKS),
    Row("tiny", "train", 4, 16),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Timing, peak measurement and comparison settings of one run."""

    rounds: int
    calls: int | None  # per round; None sizes rounds by `round_seconds`
    round_seconds: float
    warmup: int
    peak_size: int
    peak_repeats: int
    atol: float
    seed: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0]
    )

    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 2 rounds of 2 calls, 512x512 matmul peak: a smoke test",
    )

    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="PATTERN",
        help="rows to run, by name or shell pattern such as 'base-*' (default: all; "
        "see --list-rows)",
    )

    parser.add_argument(
        "--list-rows", action="store_true", help="print the row names and exit"
    )

    parser.add_argument(
        "--rounds", type=int, help="timed rounds per framework (default 5, quick 2)"
    )

    parser.add_argument(
        "--calls",
        type=int,
        help="calls per timed round (default: as many as fill --round-seconds; "
        "quick 2)",
    )

    parser.add_argument(
        "--round-seconds",
        type=float,
        default=3.0,
        help="target length of a timed round in seconds, when --calls is not set "
        "(default 3)",
    )

    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls before the rounds, at least 1 because the first "
        "sets the calls per round (default 2, quick 1)",
    )

    parser.add_argument(
        "--peak-size",
        type=int,
        help="side of the square float32 matmuls that measure the peak "
        "(default 4096, quick 512)",
    )

    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest allowed max abs difference of the outputs (default 1e-3)",
    )

    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the random checkpoints and input arrays, kept and reused "
        "between runs (default: a temporary folder, deleted at the end)",
    )

    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="folder for RESULTS.md, results.png and results.json (default bench/)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line. `args.selected` lists the rows to run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("rounds", "calls", "warmup", "peak_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.round_seconds <= 0:
        parser.error(f"--round-seconds must be positive, got {args.round_seconds}")
    if args.atol <= 0:
        parser.error(f"--atol must be positive, got {args.atol}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder")
    if args.work_dir is not None and args.work_dir.is_file():
        parser.error(f"--work-dir {args.work_dir} is a file; pass a folder")
    args.selected = select_rows(parser, args)
    return args


def select_rows(parser: argparse.ArgumentParser, args) -> list[Row]:
    rows = QUICK_ROWS if args.quick else FULL_ROWS
    if not args.rows:
        return list(rows)
    names = [row.name for row in rows]
    unmatched = [p for p in args.rows if not fnmatch.filter(names, p)]
    if unmatched:
        parser.error(
            f"--rows {' '.join(unmatched)} matches no row; the rows"
            f"{' of --quick' if args.quick else ''} are: {', '.join(names)}"
        )
    return [row for row in rows if any(fnmatch.fnmatch(row.name, p) for p in args.rows)]


def make_settings(args) -> Settings:
    quick = args.quick
    return Settings(
        rounds=args.rounds or (2 if quick else 5),
        calls=args.calls or (2 if quick else None),
        round_seconds=args.round_seconds,
        warmup=args.warmup or (1 if quick else 2),
        peak_size=args.peak_size or (512 if quick else 4096),
        peak_repeats=3 if quick else 5,
        atol=args.atol,
        seed=args.seed,
    )


def _preset_dict(size: str) -> dict:
    """Read configs/SIZE.py without importing bt_jax (and so JAX) here."""
    path = REPO / "configs" / f"{size}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_preset_{size}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def missing_itc_sizes(size: str) -> dict:
    """Return the entries of ITC_DEFAULTS that configs/SIZE.py does not set."""
    config = _preset_dict(size)
    return {k: v for k, v in ITC_DEFAULTS.items() if config.get(k) is None}


def make_checkpoint(
    size: str, work_dir: Path, *, head: str = "mlm+itm+itc", processor: bool = False
) -> Path:
    """Write (or reuse) a random checkpoint of a model preset with `head`.

    `processor` adds `init-random --processor`'s files: preprocessor_config.json
    at the preset's image size and a byte-level BPE tokenizer trained on the
    sample captions, which needs a vocabulary of at least 300 tokens.
    """
    name = f"{size}-{head.replace('+', '-')}{'-processor' if processor else ''}"
    directory = work_dir / name
    if (directory / "config.json").is_file():
        logger.info("reusing the random %s checkpoint in %s", size, directory)
        return directory

    config = {**_preset_dict(size), **missing_itc_sizes(size)}
    preset = work_dir / f"{size}_preset.py"
    preset.write_text(
        f'"""configs/{size}.py with ITC head sizes, written by '
        'bench.__main__.make_checkpoint."""\n\n'
        "import json\n\n\ndef get_config():\n"
        f"    return json.loads({json.dumps(config)!r})\n"
    )

    logger.info("writing a random %s checkpoint to %s", size, directory)
    started = time.perf_counter()
    command = [sys.executable, "-m", "convert", "init-random"]
    command += ["--config", str(preset), "--head", head, str(directory)]
    if processor:
        command.insert(-1, "--processor")
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **WORKER_ENVIRONMENT},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(
            f"`{' '.join(command)}` failed with code {result.returncode}:\n"
            f"{result.stderr[-3000:]}"
        )
    logger.info("wrote it in %.0f s", time.perf_counter() - started)
    return directory


def make_inputs(row: Row, config: dict, path: Path, seed: int) -> Path:
    """Write the row's input arrays (NHWC pixels, as bt-jax takes them) to .npz."""
    text = config["text_config"]
    vision = config["vision_config"]
    rng = np.random.default_rng(seed)
    shape = (row.batch, row.length)
    input_ids = rng.integers(3, text["vocab_size"], shape)
    input_ids[:, 0] = text["bos_token_id"]
    input_ids[:, -1] = text["eos_token_id"]

    side = vision["image_size"]
    channels = vision.get("num_channels", 3)
    arrays = {
        "input_ids": input_ids,
        "attention_mask": np.ones(shape, np.int64),
        "pixel_values": rng.standard_normal(
            (row.batch, side, side, channels), dtype=np.float32
        ),
    }
    if row.task.startswith("train"):
        # Mask 15% of the tokens between the first and the last, at least one.
        inner = row.length - 2
        chosen = rng.random((row.batch, inner)) < 0.15
        chosen[np.arange(row.batch), rng.integers(0, inner, row.batch)] = True
        selected = np.zeros(shape, bool)
        selected[:, 1:-1] = chosen
        # RoBERTa's <mask> is the last id of its vocabulary (50264 of 50265).
        mask_id = text["vocab_size"] - 1
        arrays["mlm_input_ids"] = np.where(selected, mask_id, input_ids)
        arrays["mlm_labels"] = np.where(selected, input_ids, -100)
        arrays["record_index"] = np.arange(row.batch, dtype=np.int64)
    np.savez(path, **arrays)
    return path


def compare_outputs(jax_path: Path, torch_path: Path, atol: float) -> dict:
    """Return the max abs difference of the outputs, raising ValueError above `atol`."""
    jax_out, torch_out = np.load(jax_path), np.load(torch_path)
    if jax_out.shape != torch_out.shape:
        raise ValueError(
            f"the bt-jax output shape {jax_out.shape} differs from "
            f"PyTorch's {torch_out.shape}"
        )
    for framework, values in (("bt-jax", jax_out), ("PyTorch", torch_out)):
        if not np.isfinite(values).all():
            raise ValueError(f"the {framework} output contains NaN or inf")
    difference = np.abs(jax_out.astype(np.float64) - torch_out)
    error = float(difference.max()) if difference.size else 0.0
    if error > atol:
        raise ValueError(
            f"bt-jax and PyTorch outputs differ by up to {error:.2e}, "
            f"more than --atol {atol:.0e}, so the benchmark would compare different "
            "computations."
        )
    scale = float(np.abs(torch_out).max()) if torch_out.size else 0.0
    return {"max_abs_diff": error, "output_max_abs": scale}


def _calls_per_round(settings: Settings, warmup_seconds: list[float]) -> int:
    if settings.calls is not None:
        return settings.calls
    return max(1, round(settings.round_seconds / warmup_seconds[-1]))


def _measure(
    workers: dict[str, Worker],
    row: Row,
    request: dict,
    paths: dict[str, Path],
    settings: Settings,
    measure_peak: bool,
) -> dict[str, dict]:
    """Load, check, warm up and time `workers`, alternating their timed rounds."""
    # One at a time, so that bt-jax's compile time is measured without the
    # PyTorch worker loading on the same cores.
    for worker in workers.values():
        worker.wait_ready()
    loaded = {
        name: worker.request("load", **request) for name, worker in workers.items()
    }
    for name, worker in workers.items():
        worker.request("outputs", path=str(paths[name]))

    calls = {}
    for name, worker in workers.items():
        warmup = worker.request("run", calls=settings.warmup)["seconds"]
        calls[name] = _calls_per_round(settings, warmup)
    rates = {name: [] for name in workers}
    for _ in range(settings.rounds):
        for name, worker in workers.items():
            seconds = worker.request("run", calls=calls[name])["seconds"]
            rates[name].append(row.batch * len(seconds) / sum(seconds))

    measured = {}
    for name, worker in workers.items():
        stats = worker.request("stats")
        measured[name] = {
            "pairs_per_second": rates[name],
            "median": statistics.median(rates[name]),
            "calls_per_round": calls[name],
            "compile_seconds": loaded[name]["compile_seconds"],
            **stats,
        }
        loss = stats["last_loss"]
        if row.task.startswith("train") and not (
            loss is not None and math.isfinite(loss)
        ):
            raise ValueError(f"the {name} training loss is {loss}")
        if measure_peak:
            # After `stats`, so the matmuls do not count in the rows' peak RSS.
            measured[name]["matmul_peak_gflops"] = worker.request(
                "matmul_peak", size=settings.peak_size, repeats=settings.peak_repeats
            )["gflops"]
    return measured


def run_row(
    row: Row,
    checkpoint: Path,
    config: dict,
    work_dir: Path,
    settings: Settings,
    measure_peak: bool,
) -> dict:
    """Benchmark one row in a fresh pair of workers and return its results."""
    inputs = make_inputs(row, config, work_dir / f"{row.name}.npz", settings.seed)
    request = {"task": row.task, "checkpoint": str(checkpoint), "inputs": str(inputs)}
    paths = {name: work_dir / f"{row.name}.{name}.npy" for name in FRAMEWORKS}
    if row.task.startswith("train"):
        # Both training processes together need more memory than a 24 GiB
        # machine has, so the frameworks run one after the other.
        measured = {}
        for name in FRAMEWORKS:
            with Worker(name) as worker:
                measured.update(
                    _measure(
                        {name: worker}, row, request, paths, settings, measure_peak
                    )
                )
    else:
        with Worker("jax") as jax_worker, Worker("torch") as torch_worker:
            workers = {"jax": jax_worker, "torch": torch_worker}
            measured = _measure(workers, row, request, paths, settings, measure_peak)
    result = {"row": row.name, **dataclasses.asdict(row)}
    result["image_size"] = config["vision_config"]["image_size"]
    result["sequential"] = row.task.startswith("train")
    result.update(compare_outputs(paths["jax"], paths["torch"], settings.atol))
    for path in paths.values():
        path.unlink()
    for name, values in measured.items():
        peak = values.pop("matmul_peak_gflops", None)
        if peak is not None:
            result.setdefault("matmul_peak_gflops", {})[name] = peak
        result[name] = values
    result["ratio"] = result["jax"]["median"] / result["torch"]["median"]
    result["flops_per_call"] = row_flops(row, config)
    if row.task.startswith("train"):
        result["reference_extra_flops"] = flops.train_reference_extra_flops(
            config, row.batch, row.length
        )
    else:
        result["reference_extra_flops"] = flops.reference_extra_flops(
            config, row.task, row.batch, row.length
        )
    return result


def row_flops(row: Row, config: dict) -> int:
    if row.task.startswith("train"):
        return flops.train_step_flops(
            config, row.batch, row.length, share_image_encoding=row.task == "train"
        )
    return flops.forward_flops(config, row.batch, row.length, row.task)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_rows:
        print("\n".join(row.name for row in args.selected))
        return 0
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    settings = make_settings(args)
    command = ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        sizes = dict.fromkeys(row.size for row in args.selected)
        checkpoints, configs = {}, {}
        for size in sizes:
            try:
                checkpoints[size] = make_checkpoint(size, work_dir)
            except RuntimeError as err:
                logger.error("%s", err)
                return 1
            configs[size] = json.loads(
                (checkpoints[size] / "config.json").read_text(encoding="utf-8")
            )

        results = []
        for index, row in enumerate(args.selected):
            try:
                result = run_row(
                    row,
                    checkpoints[row.size],
                    configs[row.size],
                    work_dir,
                    settings,
                    measure_peak=index == len(args.selected) - 1,
                )
            except (ValueError, WorkerError) as err:
                logger.error("%s failed: %s", row.name, err)
                return 1
            results.append(result)
            logger.info("%s", report.row_summary(result))

    peak = results[-1]["matmul_peak_gflops"]
    itc_defaults = {size: missing_itc_sizes(size) for size in sizes}
    document = report.build(
        results,
        peak,
        settings=dataclasses.asdict(settings),
        command=command,
        seconds=time.perf_counter() - started,
        itc_defaults={size: found for size, found in itc_defaults.items() if found},
        load_average=(load_before, os.getloadavg()[0]),
    )
    paths = report.write(document, args.out)
    print(report.table(document))
    logger.info("wrote %s", ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
