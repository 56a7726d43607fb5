"""Input records for the embedding job: a JSON Lines file or a folder of images.

Both sources are read lazily, one record at a time, in a fixed order, so a job
can stream any number of records and restart at any position. Each position
becomes a `Record`, or an `Invalid` with the reason it cannot be embedded.

JSON Lines: one object per line with

- `image`: an image path, relative to the folder of the JSON Lines file or
  absolute (needed for joint and image embeddings);
- `text` or `caption`: the text (needed for joint and text embeddings);
- `id` (optional): the record's name in the output, a string or an integer;
  by default, or when null, `line-N`.

Other fields are kept and copied to the output's `ids.jsonl`, so a `label`
field can colour a plot later. A field named `position` is replaced there by
the record's position in the file. Duplicate ids are not checked. The file may
start with a UTF-8 byte order mark; a line that is not valid UTF-8 is skipped.

Folder: every image file below it (.jpg, .jpeg, .png, .bmp, .gif, .webp,
.tif, .tiff), in sorted path order. A record's text is the file with the same
name and the `.txt` extension beside the image, its id is the image's path
relative to the folder, and its `label` is its first sub-folder, if any (as in
`cats/001.jpg`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
TEXT_FIELDS = ("text", "caption")
# Bytes read at a time when fingerprinting a JSON Lines file.
_READ_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Record:
    """One input to embed: `position` is its place in the source, from 0."""

    position: int
    id: str
    image: Path | None
    text: str | None
    fields: dict[str, Any]  # what goes to ids.jsonl

    def listing(self) -> dict[str, Any]:
        """Return the ids.jsonl row; `position` replaces a field of that name."""
        return {**self.fields, "position": self.position}


@dataclasses.dataclass(frozen=True)
class Invalid:
    """A position that cannot be embedded, and why."""

    position: int
    id: str
    reason: str

    def listing(self) -> dict[str, Any]:
        return {"position": self.position, "id": self.id, "reason": self.reason}


class _Source:
    """Shared parts of the sources: the record count and the input's fingerprint."""

    path: Path
    _count: int
    _digest: str
    _digest_name: str

    def __len__(self) -> int:
        return self._count

    def fingerprint(self) -> dict[str, Any]:
        """Identify the input, so a resumed job can check that it has not changed."""
        return {"input": str(self.path.resolve()), self._digest_name: self._digest}


class JsonlSource(_Source):
    """Records from a JSON Lines file; see the module docstring for the fields."""

    _digest_name = "sha256"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSON Lines file not found: {self.path}")
        self.root = self.path.parent
        digest = hashlib.sha256()
        count = 0
        with self.path.open("rb") as file:
            while block := file.read(_READ_BLOCK):
                digest.update(block)
                count += block.count(b"\n")
            if file.tell() and not _ends_with_newline(self.path):
                count += 1
        if _starts_with(self.path, b"["):
            raise ValueError(
                f"{self.path} looks like a JSON array, not JSON Lines; write one JSON "
                "object per line."
            )
        self._count = count
        self._digest = digest.hexdigest()

    def raw(self) -> Iterator[bytes]:
        """Yield each line's bytes, unparsed, so skipping a position is cheap.

        Lines end at "\n" only, as they are counted. A lone "\r" stays inside its
        line and makes it invalid JSON, so it cannot shift the later positions.
        """
        with self.path.open("rb") as file:
            yield from file

    def parse(self, position: int, raw: bytes) -> Record | Invalid:
        where = f"line-{position + 1}"
        try:
            # A byte order mark may start the file.
            raw = raw.decode("utf-8-sig" if position == 0 else "utf-8")
        except UnicodeDecodeError as err:
            return Invalid(position, where, f"invalid UTF-8: {err.reason}")

        if not raw.strip():
            return Invalid(position, where, "empty line")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            return Invalid(position, where, f"invalid JSON: {err.msg}")
        if not isinstance(value, dict):
            return Invalid(
                position, where, f"a JSON {type(value).__name__}, not an object"
            )

        record_id = value.get("id")
        if record_id is None:
            record_id = where
        if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
            return Invalid(
                position, where, f"id {record_id!r} must be a string or an integer"
            )
        record_id = str(record_id)

        image = value.get("image")
        if image is not None and not isinstance(image, str):
            return Invalid(
                position,
                record_id,
                f"image must be a path string, got {type(image).__name__}",
            )
        if image is not None and not image.strip():
            return Invalid(position, record_id, "empty image path")
        text_field = next((f for f in TEXT_FIELDS if value.get(f) is not None), None)
        text = value[text_field] if text_field else None
        if text is not None and not isinstance(text, str):
            return Invalid(
                position,
                record_id,
                f"{text_field} must be a string, got {type(text).__name__}",
            )

        fields = {
            key: item
            for key, item in value.items()
            if key not in ("id", "image", *TEXT_FIELDS)
        }
        fields = {"id": record_id, "image": image, "text": text, **fields}
        path = None if image is None else self.root / image
        return Record(position, record_id, path, text, fields)


class FolderSource(_Source):
    """Records from the image files below a folder; see the module docstring."""

    _digest_name = "listing_sha256"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise NotADirectoryError(f"input folder not found: {self.path}")
        digest = hashlib.sha256()
        count = 0
        for relative in self._walk():
            # Sizes and modification times of the image and its caption file make
            # an edited or replaced file change the fingerprint.
            digest.update(relative.encode("utf-8", "surrogateescape") + b"\0")
            for file in (
                self.path / relative,
                (self.path / relative).with_suffix(".txt"),
            ):
                try:
                    stat = file.stat()
                except OSError:
                    digest.update(b"-\0")
                    continue
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\0".encode())
            count += 1
        self._count = count
        self._digest = digest.hexdigest()

    def _walk(self, directory: Path | None = None, prefix: str = "") -> Iterator[str]:
        """Yield image paths relative to the folder, sorted, one directory at a time.

        NOTE: each directory's listing is sorted in memory, about 300 bytes per
        file, so a flat folder of millions of images costs hundreds of MB here.
        Split such a folder into sub-folders, or list the files in JSON Lines.
        """
        directory = directory or self.path
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = f"{prefix}{entry.name}"
            # Linked folders are not followed, so a link loop cannot recurse forever.
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), relative + "/")
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield relative

    def raw(self) -> Iterator[str]:
        return self._walk()

    def parse(self, position: int, raw: str) -> Record | Invalid:
        image = self.path / raw
        caption_file = image.with_suffix(".txt")
        text = None
        if caption_file.is_file():
            try:
                text = caption_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                return Invalid(position, raw, f"unreadable caption file: {err}")
        fields: dict[str, Any] = {"id": raw, "image": raw, "text": text}
        if "/" in raw:
            fields["label"] = raw.split("/", 1)[0]
        return Record(position, raw, image, text, fields)


def open_source(path: str | os.PathLike) -> JsonlSource | FolderSource:
    """Open a folder of images or a JSON Lines file of records."""
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if not path.exists():
        raise FileNotFoundError(
            f"input not found: {path}. Pass a folder of images or a JSON Lines file."
        )
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(
            f"{path} is neither a folder nor a JSON Lines file (.jsonl); pass one "
            "of those."
        )
    return JsonlSource(path)


def check_record(record: Record, kinds: tuple[str, ...]) -> Invalid | None:
    """Return why `record` lacks what `kinds` needs, or None if it has it all."""
    if "joint" in kinds or "text" in kinds:
        if record.text is None:
            return Invalid(record.position, record.id, "no caption")
        if not record.text.strip():
            return Invalid(record.position, record.id, "empty caption")
    if ("joint" in kinds or "image" in kinds) and record.image is None:
        return Invalid(record.position, record.id, "no image")
    return None


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Return whether the file's first non-whitespace bytes (after a BOM) are `prefix`."""
    with path.open("rb") as file:
        head = file.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(prefix)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
