"""Sample photographs with English captions, for trying retrieval and captioning.

The set pairs 15 real photographs with 3 to 5 captions each. The captions were
written for this project in the plain, one-sentence style of COCO captions and
are stored in the packaged file `captions.jsonl`. The photos themselves are the
sample images that the scikit-image wheel installs in its `skimage/data` folder,
so nothing is downloaded: `load_samples` only accepts files found in that folder
and never calls the `skimage.data` functions that fetch files from the network.
Each sample's `id` is the name of its `skimage.data` function, and its `license`
note is copied from that function's docstring in scikit-image 0.26.0.

`materialize` copies the photos and writes one JSON line per caption, the usual
layout for image-text training and evaluation data.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bt_jax.fileio import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["SamplePhoto", "load_samples", "materialize", "read_jsonl"]

CAPTIONS_RESOURCE = "captions.jsonl"
IMAGES_DIR = "images"
MIN_CAPTIONS = 3
SKIMAGE_REQUIREMENT = "scikit-image==0.26.0"
_RECORD_FIELDS = {"id": str, "file": str, "captions": list, "license": str}


@dataclasses.dataclass(frozen=True)
class SamplePhoto:
    """A photo from scikit-image's data folder with its captions.

    Attributes:
      id: Unique name of the sample, the name of its `skimage.data` function.
      file: File name inside the installed `skimage/data` folder.
      captions: English captions, one sentence each.
      license: License and source of the photo, as scikit-image states them.
    """

    id: str
    file: str
    captions: tuple[str, ...]
    license: str

    def path(self) -> Path:
        """Return the path of the photo in the installed scikit-image package.

        Raises:
          ModuleNotFoundError: scikit-image is not installed.
        """
        return _skimage_data_dir() / self.file


def _skimage_data_dir() -> Path:
    """Return the `data` folder of the installed scikit-image package.

    Raises:
      ModuleNotFoundError: scikit-image is not installed.
    """
    try:
        import skimage
    except ImportError as err:
        raise ModuleNotFoundError(
            "scikit-image is not installed, but the sample photos are read from "
            f"its data folder. Install it with `pip install {SKIMAGE_REQUIREMENT}`."
        ) from err
    return Path(skimage.__file__).parent / "data"


def load_samples() -> list[SamplePhoto]:
    """Read and validate the packaged sample set.

    Raises:
      ModuleNotFoundError: scikit-image is not installed.
      ValueError: a record in `captions.jsonl` is invalid or names a file that
        the installed scikit-image does not contain.
    """
    resource = importlib.resources.files(__name__).joinpath(CAPTIONS_RESOURCE)
    text = resource.read_text(encoding="utf-8")
    return _parse_samples(text, source=str(resource), data_dir=_skimage_data_dir())


def _parse_samples(text: str, *, source: str, data_dir: Path) -> list[SamplePhoto]:
    """Parse sample records from JSONL text and check them against `data_dir`.

    `source` names the text in error messages. Each record needs the fields of
    `SamplePhoto`, at least `MIN_CAPTIONS` non-empty captions, an id and a file
    that no other record uses, and a file that exists in `data_dir`.

    Raises:
      ValueError: a record is invalid. The message gives the line, the sample id
        and the fix.
    """
    photos: list[SamplePhoto] = []
    line_of_id: dict[str, int] = {}
    line_of_file: dict[str, int] = {}
    for line_number, record in _iter_json_objects(text, source):
        where = f"{source}:{line_number}"
        photo = _photo_from_record(record, where)
        where = f"{where} (sample {photo.id!r})"

        if photo.id in line_of_id:
            raise ValueError(
                f"{where}: duplicate id, also used on line {line_of_id[photo.id]}. "
                "Give each sample a unique id."
            )
        if photo.file in line_of_file:
            raise ValueError(
                f"{where}: file {photo.file!r} is also used on line "
                f"{line_of_file[photo.file]}. Each photo may appear only once."
            )
        if not (data_dir / photo.file).is_file():
            raise ValueError(
                f"{where}: file {photo.file!r} not found in {data_dir}. The sample "
                f"set was written for {SKIMAGE_REQUIREMENT}, so install that version "
                f"with `pip install {SKIMAGE_REQUIREMENT}` or remove the record."
            )
        line_of_id[photo.id] = line_number
        line_of_file[photo.file] = line_number
        photos.append(photo)

    if not photos:
        raise ValueError(f"{source}: no sample records found. Add one per line.")
    return photos


def _photo_from_record(record: dict[str, Any], where: str) -> SamplePhoto:
    """Check the fields of one sample record and build its `SamplePhoto`."""
    missing = [name for name in _RECORD_FIELDS if name not in record]
    if missing:
        raise ValueError(
            f"{where}: record {record.get('id', '<no id>')!r} is missing the fields "
            f"{missing}. Each record needs {sorted(_RECORD_FIELDS)}."
        )
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: record {record['id']!r} has unknown fields {unknown}. "
            f"Check the spelling against the allowed fields {sorted(_RECORD_FIELDS)}."
        )
    for name, expected_type in _RECORD_FIELDS.items():
        if not isinstance(record[name], expected_type):
            raise ValueError(
                f"{where}: field {name!r} of record {record['id']!r} must be a "
                f"{expected_type.__name__}, got {type(record[name]).__name__}."
            )
    where = f"{where} (sample {record['id']!r})"

    if not record["id"].strip():
        raise ValueError(f"{where}: the id is empty. Set a non-empty id.")
    file_name = record["file"]
    if not file_name or Path(file_name).name != file_name:
        raise ValueError(
            f"{where}: file {file_name!r} must be a bare file name inside the "
            "skimage/data folder, with no directory part."
        )
    captions = record["captions"]
    if not all(isinstance(caption, str) and caption.strip() for caption in captions):
        raise ValueError(
            f"{where}: every caption must be a non-empty string, got {captions!r}."
        )
    if len(captions) < MIN_CAPTIONS:
        raise ValueError(
            f"{where}: {len(captions)} captions found, at least {MIN_CAPTIONS} "
            "are required. Add captions to the record."
        )
    if not record["license"].strip():
        raise ValueError(
            f"{where}: the license is empty. Copy the license note from the "
            "docstring of the matching skimage.data function."
        )
    return SamplePhoto(
        id=record["id"],
        file=file_name,
        captions=tuple(captions),
        license=record["license"],
    )


def materialize(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Copy the sample photos into `directory` and write one JSON line per caption.

    The result is `directory/images/<file>` for each photo, copied byte for byte,
    and `directory/captions.jsonl` with lines such as
    `{"image": "images/astronaut.png", "caption": "...", "id": "astronaut/0",
    "photo": "astronaut"}`, where `image` is relative to the folder of the JSONL
    file, `id` names the caption and `photo` the sample. The folder is
    built in a temporary sibling and renamed into place, so a failure leaves
    `directory` as it was.

    Returns:
      The absolute path of the written `captions.jsonl`.

    Raises:
      FileExistsError: `directory` exists, is not empty, and `overwrite` is False.
      NotADirectoryError: `directory` exists and is not a directory.
      ModuleNotFoundError: scikit-image is not installed.
      ValueError: the packaged sample set is invalid (see `load_samples`).
    """
    target = Path(directory).absolute()
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(
                f"output path {target} exists and is not a directory. "
                "Pass a directory path."
            )
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output directory {target} is not empty. Choose an empty or new "
                "directory, or pass overwrite=True to replace its contents."
            )
    photos = load_samples()

    # overwrite=True is safe here because the checks above let the code reach
    # this point only when `target` is missing, empty, or `overwrite` is set.
    with atomic_directory(target, overwrite=True) as staging:
        (staging / IMAGES_DIR).mkdir()
        lines = []
        for photo in photos:
            shutil.copyfile(photo.path(), staging / IMAGES_DIR / photo.file)
            image = f"{IMAGES_DIR}/{photo.file}"
            for number, caption in enumerate(photo.captions):
                record = {
                    "image": image,
                    "caption": caption,
                    "id": f"{photo.id}/{number}",
                    "photo": photo.id,
                }
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(staging / CAPTIONS_RESOURCE, "w", encoding="utf-8") as stream:
            stream.writelines(lines)

    logger.info(
        "Wrote %d sample photos and %d captions to %s",
        len(photos),
        len(lines),
        target,
    )
    return target / CAPTIONS_RESOURCE


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an image-caption JSONL file such as the one `materialize` writes.

    Each non-blank line must be a JSON object with a string `image` field. That
    field is resolved against the folder of the JSONL file and returned as an
    absolute path string. The other fields are returned unchanged, and the image
    files are not opened or checked for existence.

    Raises:
      ValueError: a line is not valid JSON, not an object, or has no string
        `image` field. The message gives the file and line number.
    """
    path = Path(path)
    base = path.absolute().parent
    records = []
    for line_number, record in _iter_json_objects(
        path.read_text(encoding="utf-8"), str(path)
    ):
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(
                f"{path}:{line_number}: expected a non-empty string field 'image', "
                f"got {image!r}. Set it to the image path, relative to the folder "
                "of the JSONL file."
            )
        records.append({**record, "image": str((base / image).resolve())})
    return records


def _iter_json_objects(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, object)` for each non-blank line of JSONL text.

    Line numbers start at 1. `source` names the text in error messages.
    """
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source}:{line_number}: invalid JSON ({err.msg} at column "
                f"{err.colno}). Each line must contain one JSON object."
            ) from err
        if not isinstance(value, dict):
            raise ValueError(
                f"{source}:{line_number}: expected a JSON object, got "
                f"{type(value).__name__}."
            )
        yield line_number, value
