"""Write an evaluation result as JSON and as an aligned text table."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def write_results(
    result: Mapping[str, Any], out_dir: str | os.PathLike, name: str
) -> tuple[Path, str]:
    """Write `result` to `{name}.json` and `{name}.txt` in `out_dir`.

    Each file is written to a temporary file in `out_dir` and renamed over the
    target, so a reader never sees a partial file. Nested mappings stay nested
    in the JSON and become "outer/inner" rows in the table. NumPy scalars and
    arrays are converted to plain numbers and lists. NaN and infinite values
    are written as JSON null (strict JSON has no such numbers) and shown as
    "nan", "inf" or "-inf" in the table.

    Args:
      result: metric name to value, such as the dict an evaluator returns.
      out_dir: the directory, created if missing.
      name: the file name without suffix; no path separators.

    Returns:
      The path of the JSON file and the table text, which is also logged.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(
            f"name must be a plain file name without a directory, got {name!r}."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = _to_json(result)
    table = format_table(result)
    json_path = out_dir / f"{name}.json"
    _write_atomic(json_path, json.dumps(plain, indent=2, allow_nan=False) + "\n")
    _write_atomic(out_dir / f"{name}.txt", table + "\n")
    logger.info("evaluation %s, written to %s:\n%s", name, json_path, table)
    return json_path, table


def format_table(result: Mapping[str, Any]) -> str:
    """Format `result` as two aligned columns, metric and value.

    Floats get 4 decimals, integers none. Nested mappings become
    "outer/inner" rows.
    """
    rows = [(key, _format_value(value)) for key, value in _flatten(result)]
    key_width = max([len("metric"), *(len(key) for key, _ in rows)])
    value_width = max([len("value"), *(len(value) for _, value in rows)])
    lines = [
        f"{'metric':<{key_width}}  {'value':>{value_width}}",
        f"{'-' * key_width}  {'-' * value_width}",
    ]
    lines += [f"{key:<{key_width}}  {value:>{value_width}}" for key, value in rows]
    return "\n".join(lines)


def _flatten(result: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in result.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}/")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}" if math.isfinite(value) else str(float(value))
    return str(value)


def _to_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_to_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, text: str) -> None:
    # os.open with mode 0o666 applies the umask as a plain open() would, which
    # tempfile's private 0600 files do not.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
