"""Execute a notebook headless and save it with its outputs.

Usage: python notebooks/execute.py NOTEBOOK OUTPUT [--cwd DIR]

The notebook runs in a Jupyter kernel of this interpreter, in DIR (default: the
folder of OUTPUT), so relative paths in it resolve there. The kernel imports
bt_jax from this checkout. Environment variables
pass through, for example BT_JAX_CHECKPOINT and BT_JAX_FIGURE for the
quickstart. The exit status is 1, with the failing cell's traceback, when a cell
raises.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbclient
import nbformat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="notebook to run")
    parser.add_argument("output", type=Path, help="where to save the executed copy")
    parser.add_argument("--cwd", type=Path, help="working directory of the kernel")
    args = parser.parse_args(argv)

    # The kernel runs in another folder. This checkout goes first on its path, so
    # it imports the bt_jax next to this script rather than an installed copy.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [repo, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    notebook = nbformat.read(args.notebook, as_version=4)
    cwd = (args.cwd or args.output.parent).resolve()
    cwd.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        print(f"error: a cell of {args.notebook} failed:\n{err}", file=sys.stderr)
        return 1
    finally:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, args.output)
    print(f"ran {args.notebook} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
