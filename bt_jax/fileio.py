"""Atomic creation of output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    The temporary directory is a sibling of `path`, so the final rename stays on
    one file system. If the block raises, the temporary directory is removed and
    `path` is left as it was.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"output directory already exists: {path}. Choose a new path or pass "
            "overwrite=True (--overwrite on the command line) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    # mkdtemp makes the directory private (0700); give it the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if path.exists():
            backup = Path(
                tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)
            )
            os.rename(path, backup / path.name)
            os.rename(staging, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
