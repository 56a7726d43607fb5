"""The embedding job: records in, `.npy` matrices and an ids file out, resumably.

The source's positions are cut into shards of `shard_size` positions. Each shard
is embedded in turn and written to `OUT/shards/` under temporary names, then
renamed into place, its `.done.json` marker last. A rerun of the same command
skips every shard with a marker, so an interrupted job loses at most the shard
it was in. When all shards are done they are joined, streaming, into

- `OUT/joint.npy` (and `text.npy`, `image.npy` when asked for): one
  L2-normalised row per embedded record, in source order;
- `OUT/ids.jsonl`: one line per row, the record's `id`, `image`, `text` and
  other fields, with its `position` in the source;
- `OUT/skipped.jsonl`: each position that was skipped, with the reason;
- `OUT/manifest.json`: the settings and counts, which a rerun checks so that a
  job never mixes shards made with other settings.

Texts longer than the model's token limit are truncated, as transformers'
processor does, and counted. The settings (the model's
fingerprint and the number of devices included) are stored in the manifest,
and a rerun with other settings is rejected, so one output never mixes rows
made differently.

Memory stays flat: one shard's embeddings and ids, and a few batches of images,
are held at a time, and the final files are written a shard at a time. The
results do not depend on where a job was interrupted, because shard and batch
boundaries depend only on the source.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import logging
import numbers
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bt_jax.embed.embedder import Embedder, pad_pixels, parse_kinds
from bt_jax.embed.records import (
    FolderSource,
    Invalid,
    JsonlSource,
    Record,
    check_record,
    open_source,
)
from bt_jax.processing import ImageFileError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IDS = "ids.jsonl"
SKIPPED = "skipped.jsonl"
SHARDS = "shards"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class JobResult:
    """Outputs and counts of a finished job."""

    out: Path
    embedded: int
    skipped: int
    total: int
    kinds: tuple[str, ...]
    truncated: int  # texts cut to the model's token limit
    seconds: float  # time spent embedding in this run, not in earlier ones
    pairs_embedded_now: int  # rows embedded in this run

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_embedded_now / self.seconds if self.seconds else 0.0


class SettingsMismatchError(ValueError):
    """The output folder contains a job started with other settings or input."""


def run(
    embedder: Embedder,
    source: JsonlSource | FolderSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    kinds: str | tuple[str, ...] = "joint",
    shard_size: int = 1024,
    model: str = "",
    overwrite: bool = False,
    keep_shards: bool = False,
    progress: bool = True,
    workers: int = 4,
) -> JobResult:
    """Embed every record of `source` into `out`, resuming a job already there.

    Args:
      embedder: the model; its batch size and output dtype are settings of the
        job.
      source: the records, from `records.open_source`, or the path to open.
      out: the output folder; created if missing.
      kinds: embeddings to write, among joint, text and image.
      shard_size: positions per shard, the unit of resumption.
      model: the checkpoint path, recorded in the manifest for `search`.
      overwrite: delete the job already in `out` and start again; a folder
        that is not an embedding job's output is never deleted.
      keep_shards: keep `out/shards/` after joining them.
      progress: show a progress bar.
      workers: threads decoding and resizing images.

    Raises:
      SettingsMismatchError: `out` contains a job with other settings or input.
      FileExistsError: `out` is not an embedding job's folder, or another job is
        writing it.
    """
    kinds = parse_kinds(kinds)
    for name, value in (("shard_size", shard_size), ("workers", workers)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(source, (JsonlSource, FolderSource)):
        source = open_source(source)
    out = Path(out)
    with _lock(out):
        return _run(
            embedder,
            source,
            out,
            kinds=kinds,
            shard_size=int(shard_size),
            model=model,
            overwrite=overwrite,
            keep_shards=keep_shards,
            progress=progress,
            workers=int(workers),
        )


@contextlib.contextmanager
def _lock(out: Path):
    """Hold an exclusive lock beside `out`, so two jobs never write it at once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    with path.open("a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"another embedding job is writing {out} (it has locked {path}); wait for "
                "it to finish, or choose another output folder."
            ) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(file, fcntl.LOCK_UN)


def _run(
    embedder,
    source,
    out,
    *,
    kinds,
    shard_size,
    model,
    overwrite,
    keep_shards,
    progress,
    workers,
) -> JobResult:
    """Run the job; `run` has checked the arguments and holds the lock."""
    settings = {
        "format": FORMAT_VERSION,
        "kinds": list(kinds),
        "dtype": embedder.dtype.name,
        "dim": embedder.dim,
        "shard_size": shard_size,
        "batch_size": embedder.batch_size,
        "model": model,
        "compute_dtype": embedder.compute_dtype,
        "image_processor": embedder.processor.image_processor.to_dict(),
        "max_text_length": embedder.max_text_length,
        "model_fingerprint": embedder.fingerprint(),
        "devices": len(embedder.devices),
        **source.fingerprint(),
    }
    manifest = _prepare(out, settings, overwrite, source.path)
    if manifest.get("complete"):
        logger.info("%s is complete already; nothing to do", out)
        if not keep_shards and (out / SHARDS).exists():
            shutil.rmtree(out / SHARDS)
        return JobResult(
            out,
            manifest["embedded"],
            manifest["skipped"],
            len(source),
            kinds,
            manifest["truncated"],
            0.0,
            0,
        )

    shards_dir = out / SHARDS
    shards_dir.mkdir(exist_ok=True)
    total = len(source)
    count = -(-total // shard_size)
    done = {k for k in range(count) if _marker(shards_dir, k).is_file()}
    finished = sum(min(shard_size, total - k * shard_size) for k in done)
    counts = {
        "skipped": sum(
            json.loads(_marker(shards_dir, k).read_text(encoding="utf-8"))["skipped"]
            for k in done
        )
    }
    if done:
        logger.info(
            "Resuming %s: %d of %d shards are done, %d positions to go",
            out,
            len(done),
            count,
            total - finished,
        )
    bar = tqdm(
        total=total,
        initial=finished,
        unit="pair" if "joint" in kinds else "record",
        desc="Embedding",
        disable=not progress,
        smoothing=0.1,
    )
    started = time.perf_counter()
    embedded_now = 0
    raw = iter(source.raw())
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, bar:
        for k in range(count):
            size = min(shard_size, total - k * shard_size)
            chunk = [line for _, line in zip(range(size), raw, strict=False)]
            if len(chunk) < size:
                raise RuntimeError(
                    f"{source.path} changed while the job ran: it has fewer records "
                    f"than the {total} counted at the start. Rerun the job."
                )
            if k in done:
                continue
            records = [
                source.parse(k * shard_size + i, line) for i, line in enumerate(chunk)
            ]
            embedded_now += _embed_shard(
                embedder, records, kinds, shards_dir, k, pool, bar, counts
            )
    embedded, skipped, truncated = _join(
        out, kinds, count, embedder.dtype, embedder.dim
    )
    seconds = time.perf_counter() - started
    manifest.update(
        complete=True,
        embedded=embedded,
        skipped=skipped,
        truncated=truncated,
        total=total,
    )
    _write_json(out / MANIFEST, manifest)
    if not keep_shards:
        shutil.rmtree(shards_dir)
    result = JobResult(
        out, embedded, skipped, total, kinds, truncated, seconds, embedded_now
    )
    logger.info(
        "Embedded %d of %d records into %s (%s), %.1f per second in this run; "
        "%d skipped%s",
        embedded,
        total,
        out,
        ", ".join(f"{kind}.npy" for kind in kinds),
        result.pairs_per_second,
        skipped,
        f", listed in {out / SKIPPED}" if skipped else "",
    )
    if total and not embedded:
        logger.warning(
            "No record of %d could be embedded; %s gives each one's reason",
            total,
            out / SKIPPED,
        )
    if truncated:
        logger.warning(
            "%d texts were longer than the model's %d tokens and were truncated, "
            "as the reference processor does",
            truncated,
            embedder.max_text_length,
        )
    return result


def _prepare(
    out: Path, settings: dict[str, Any], overwrite: bool, input_path: Path
) -> dict[str, Any]:
    """Check or create `out` and its manifest; return the manifest."""
    manifest_file = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a folder for the output.")
    if input_path.resolve().is_relative_to(out.resolve()):
        raise ValueError(
            f"the input {input_path} is inside the output folder {out}; choose an "
            "output folder outside the input."
        )

    manifest = _read_manifest(manifest_file) if manifest_file.is_file() else None
    if out.is_dir() and any(out.iterdir()) and manifest is None:
        raise FileExistsError(
            f"{out} is not empty and is not an embedding job's folder (it has no "
            f"embedding {MANIFEST}); choose an empty or new folder for the output."
        )
    if overwrite and manifest is not None:
        shutil.rmtree(out)
        manifest = None

    if manifest is not None:
        # _read_manifest has checked that "settings" is a dict.
        stored = manifest["settings"]
        differ = {
            key: (stored.get(key), value)
            for key, value in settings.items()
            if stored.get(key) != value
        }
        if differ:
            lines = "; ".join(
                f"{key}: {old!r} there, {new!r} now"
                for key, (old, new) in differ.items()
            )
            raise SettingsMismatchError(
                f"{out} contains a job started with other settings or input ({lines}). "
                "Rerun with the same settings to resume it, pass --overwrite to start "
                "again, or choose another output folder."
            )
        return manifest

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"settings": settings, "complete": False}
    _write_json(manifest_file, manifest)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """Return an embedding job's manifest, or None for any other file of that name."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        return None
    return manifest if "format" in manifest["settings"] else None


def _marker(shards_dir: Path, k: int) -> Path:
    return shards_dir / f"shard-{k:06d}.done.json"


def _shard_file(shards_dir: Path, k: int, name: str) -> Path:
    return shards_dir / f"shard-{k:06d}.{name}"


def _load(record: Record, kinds: tuple[str, ...], embedder: Embedder):
    """Preprocess one record's image; return the pixels or an `Invalid`."""
    if "joint" not in kinds and "image" not in kinds:
        return None
    try:
        return embedder.processor.image_processor.process_one(
            record.image, record.position
        )
    except FileNotFoundError:
        return Invalid(record.position, record.id, f"missing image {record.image}")
    except (ImageFileError, OSError, ValueError) as err:
        return Invalid(record.position, record.id, f"unreadable image: {err}")


def _loaded(
    records: list[Record | Invalid],
    kinds: tuple[str, ...],
    embedder: Embedder,
    pool: concurrent.futures.Executor,
    lookahead: int,
) -> Iterator[tuple[Record | Invalid, Any]]:
    """Yield `(record, pixels)` in order, decoding up to `lookahead` ahead in `pool`."""
    pending: collections.deque = collections.deque()
    items = iter(records)

    def fill():
        while len(pending) < lookahead:
            record = next(items, None)
            if record is None:
                return
            if isinstance(record, Invalid):
                pending.append((record, None))
                continue
            problem = check_record(record, kinds)
            if problem is not None:
                pending.append((problem, None))
            else:
                pending.append((record, pool.submit(_load, record, kinds, embedder)))

    fill()
    while pending:
        record, future = pending.popleft()
        fill()
        if future is None:
            yield record, None
            continue
        pixels = future.result()
        yield (pixels, None) if isinstance(pixels, Invalid) else (record, pixels)


def _embed_shard(
    embedder: Embedder,
    records: list[Record | Invalid],
    kinds: tuple[str, ...],
    shards_dir: Path,
    k: int,
    pool: concurrent.futures.Executor,
    bar: tqdm,
    counts: dict[str, int],
) -> int:
    """Embed one shard and write its files; return how many rows it has."""
    outputs: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    listed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    batch: list[tuple[Record, Any]] = []
    in_flight = None
    truncated = [0]
    needs_image = "joint" in kinds or "image" in kinds
    needs_text = "joint" in kinds or "text" in kinds

    def submit(items):
        texts = [record.text for record, _ in items]
        ids, mask = embedder.tokens(texts) if needs_text else (None, None)
        if needs_text:
            lengths = embedder.processor.token_lengths(texts)
            truncated[0] += sum(n > embedder.max_text_length for n in lengths)
        pixels = pad_pixels([p for _, p in items]) if needs_image else None
        return embedder.submit(kinds, ids, mask, pixels), len(items)

    def finish(handle_and_rows):
        handle, rows = handle_and_rows
        result = embedder.collect(handle)
        for kind in kinds:
            outputs[kind].append(result[kind])
        bar.update(rows)

    for record, pixels in _loaded(
        records, kinds, embedder, pool, 2 * embedder.batch_size
    ):
        if isinstance(record, Invalid):
            skipped.append(record.listing())
            logger.debug("Skipping %s: %s", record.id, record.reason)
            counts["skipped"] += 1
            bar.set_postfix(skipped=counts["skipped"], refresh=False)
            bar.update(1)
            continue
        batch.append((record, pixels))
        listed.append(record.listing())
        if len(batch) == embedder.batch_size:
            # The next batch is prepared while this one runs on the device.
            if in_flight is not None:
                finish(in_flight)
            in_flight = submit(batch)
            batch = []
    if in_flight is not None:
        finish(in_flight)
    if batch:
        finish(submit(batch))

    rows = len(listed)
    for kind in kinds:
        parts = outputs[kind]
        matrix = (
            np.concatenate(parts)
            if parts
            else np.zeros((0, embedder.dim), embedder.dtype)
        )
        _atomic_save(_shard_file(shards_dir, k, f"{kind}.npy"), matrix)
    _atomic_lines(_shard_file(shards_dir, k, IDS), listed)
    _atomic_lines(_shard_file(shards_dir, k, SKIPPED), skipped)
    _write_json(
        _marker(shards_dir, k),
        {"rows": rows, "skipped": len(skipped), "truncated": truncated[0]},
    )
    return rows


def _join(
    out: Path, kinds: tuple[str, ...], count: int, dtype: np.dtype, dim: int
) -> tuple[int, int]:
    """Join the shards into the final files, one shard in memory at a time."""
    shards_dir = out / SHARDS
    markers = [
        json.loads(_marker(shards_dir, k).read_text(encoding="utf-8"))
        for k in range(count)
    ]
    rows = sum(marker["rows"] for marker in markers)
    skipped = sum(marker["skipped"] for marker in markers)
    truncated = sum(marker["truncated"] for marker in markers)
    for kind in kinds:
        target = out / f"{kind}.npy"
        temporary = target.with_name(target.name + ".tmp")
        with temporary.open("wb") as file:
            np.lib.format.write_array_header_1_0(
                file,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": (rows, dim),
                },
            )
            for k in range(count):
                part = np.load(_shard_file(shards_dir, k, f"{kind}.npy"))
                file.write(np.ascontiguousarray(part, dtype).tobytes())
        os.replace(temporary, target)
    for name in (IDS, SKIPPED):
        target = out / name
        temporary = target.with_name(target.name + ".tmp")
        with temporary.open("wb") as file:
            for k in range(count):
                with _shard_file(shards_dir, k, name).open("rb") as part:
                    shutil.copyfileobj(part, file)
        os.replace(temporary, target)
    return rows, skipped, truncated


def _atomic_save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        np.save(file, array)
    os.replace(temporary, path)


def _atomic_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    # A file name that is not valid UTF-8 contains lone surrogates, which become
    # JSON escapes ("\\udce9") instead of failing the write.
    with temporary.open("w", encoding="utf-8", errors="backslashreplace") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
