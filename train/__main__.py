"""Train a BridgeTower model from a config file.

    python -m train --config configs/demo.py --workdir runs/train-demo \
        [--config.total_steps=200 --config.optimizer.learning_rate=3e-4 ...]

The config file's `get_config()` gives every setting (see
`bt_jax.training.settings.default_config` for the fields); `--config.FIELD=VALUE`
overrides one. Rerunning the same command resumes from the newest checkpoint in
the workdir and loads the compiled step from WORKDIR/compilation_cache
instead of compiling it again. SIGTERM saves a checkpoint and exits with
status 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from train.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/NAME.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs, the report and the model."
)

_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache",
    True,
    "Keep compiled programs in WORKDIR/compilation_cache, so that rerunning the "
    "command skips compiling the step. JAX_COMPILATION_CACHE_DIR, if set, names "
    "another directory. --nocompilation_cache turns the cache off, that one too.",
)

logger = logging.getLogger("train")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("both --config and --workdir are required.")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bt_jax.checkpoint import CheckpointMismatchError
    from train.loop import NonFiniteLossError, train_and_evaluate
    from train.setup import configure_compilation_cache

    configure_compilation_cache(
        Path(_WORKDIR.value).absolute(), enabled=_COMPILATION_CACHE.value
    )

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        CheckpointMismatchError,
    ) as error:
        logger.error("%s", error)
        return 2
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
