"""Image preprocessing and tokenisation for BridgeTower, on the host with PIL and NumPy.

`BridgeTowerImageProcessor` reproduces transformers' `BridgeTowerImageProcessor`
(the PIL backend) step by step, with the same PIL calls, so its `pixel_values`
equal the reference's to float32 rounding. For each image:

1. Convert to RGB (see "Input images" below).
2. Resize with PIL bicubic. In the default `"transformers"` pipeline the short
   side becomes `size`, the long side is capped at `int(1333 / 800 * size)`,
   then each side is rounded and floored to a multiple of `size_divisor`.
3. Center-crop to `crop_size`, padding with black where the image is smaller.
4. Rescale by 1/255 (in float64, stored as float32) and normalise by the CLIP
   mean and std.

Then the batch is padded at the bottom and right to its largest image and
`pixel_mask` marks the copied pixels. Output is channels-last: `pixel_values`
`(batch, height, width, 3)` float32 and `pixel_mask` `(batch, height, width)`.

Two differences between pipelines matter for the 294 px large checkpoints:

- Their `preprocessor_config.json` sets `size` and no `crop_size`. Here the crop
  then defaults to `size` (294), as transformers 4.x's original processor did.
  transformers 5.x instead crops to its class default of 288, which does not fit
  the 21x21 position table of those checkpoints.
- The `"transformers"` pipeline floors the resized image to a multiple of 32, so
  a 294 crop is taken from a 288 px image and gets a 3-pixel black border. The
  original BridgeTower training code resized the short side straight to 294
  (torchvision `Resize` then `CenterCrop`, no flooring and no cap). Pass
  `pipeline="original"` for that transform.

Input images: file paths and encoded bytes are decoded as transformers'
`load_image` does (EXIF orientation applied, then PIL's `convert("RGB")`, which
drops any alpha channel). A transparency key that survives the conversion, as
in palette GIF and PNG files, is composited onto white when `do_convert_rgb` is
set, as the reference does. In-memory PIL images and arrays are used as given,
as the reference processor does with `do_convert_rgb=True`: transparency is
composited onto white and grayscale is repeated to three channels.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers caps the long side at this ratio of the short side (from Detectron's
# 800 / 1333 default); 479 px for 288 and 489 px for 294.
LONG_SIDE_RATIO = 1333 / 800

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
PROCESSOR_FILES = (IMAGE_PROCESSOR_FILE, PROCESSOR_FILE, *TOKENIZER_FILES)
# EXIF tag 0x0112: 1 is upright, 2-8 are flips and rotations.
EXIF_ORIENTATION = 0x0112

Pipeline = Literal["transformers", "original"]
ImageInput = PIL.Image.Image | np.ndarray | str | os.PathLike | bytes


class ImageFileError(ValueError):
    """An image file or byte string that cannot be decoded."""


def load_image(source: str | os.PathLike | bytes) -> PIL.Image.Image:
    """Decode an image file or encoded bytes into an upright RGB PIL image.

    Follows transformers' `load_image`: the EXIF orientation is applied and the
    image is converted with `convert("RGB")`. The whole file is decoded here, so a
    truncated file fails now, naming the file.

    Raises:
      FileNotFoundError: the path does not exist.
      ImageFileError: the file is not an image PIL can decode, or is truncated.
    """
    if isinstance(source, bytes):
        name, stream = f"<{len(source)} bytes>", io.BytesIO(source)
    else:
        text = os.fspath(source)
        if text.startswith(("http://", "https://")):
            raise ImageFileError(
                f"{text} is a URL; bt-jax does not download images. Download the file "
                "and pass its path."
            )
        path = Path(text)
        if path.is_dir():
            raise ImageFileError(f"{path} is a directory, not an image file.")
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        name, stream = str(path), path
    try:
        with PIL.Image.open(stream) as image:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except PIL.Image.DecompressionBombError as err:
        raise ImageFileError(
            f"image {name} is larger than PIL's limit ({err}). If the file is "
            "trusted, raise PIL.Image.MAX_IMAGE_PIXELS, or shrink the image."
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and
        # truncated data as OSError or SyntaxError, depending on the format.
        raise ImageFileError(
            f"cannot decode image {name}: {err}. Check that the file is a complete "
            "JPEG, PNG or other image PIL can open."
        ) from None


def _size_value(value: Any, name: str) -> int:
    """Read an edge length from an int or a `{"shortest_edge": n}` dict."""
    if isinstance(value, dict):
        if "shortest_edge" not in value:
            raise ValueError(
                f"{name}={value!r} has no 'shortest_edge' key; BridgeTower resizes by "
                f'the shorter side, for example {name}={{"shortest_edge": 288}}.'
            )
        value = value["shortest_edge"]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}.")
    return value


def _crop_shape(value: Any) -> tuple[int, int]:
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (
            _size_value(value["height"], "crop_size height"),
            _size_value(value["width"], "crop_size width"),
        )
    edge = _size_value(value, "crop_size")
    return edge, edge


def resize_shape(
    height: int, width: int, shorter: int, size_divisor: int
) -> tuple[int, int]:
    """Return transformers' BridgeTower resize target for an image of this size.

    The short side becomes `shorter`, and the long side keeps the aspect ratio up
    to at most `int(1333 / 800 * shorter)`. Both are then rounded and floored to
    a multiple of `size_divisor`.
    """
    longer = int(LONG_SIDE_RATIO * shorter)
    scale = shorter / min(height, width)
    if height < width:
        new_height, new_width = shorter, scale * width
    else:
        new_height, new_width = scale * height, shorter
    if max(new_height, new_width) > longer:
        scale = longer / max(new_height, new_width)
        new_height, new_width = scale * new_height, scale * new_width
    new_height, new_width = int(new_height + 0.5), int(new_width + 0.5)
    # NOTE: beyond an aspect ratio of about 15:1 the short side floors to 0, and
    # transformers then raises an unrelated error about `size`. Here that side
    # stays one `size_divisor` long instead, and the center crop pads the rest.
    return (
        max(new_height // size_divisor, 1) * size_divisor,
        max(new_width // size_divisor, 1) * size_divisor,
    )


def original_resize_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """Return torchvision `Resize(shorter)`'s target: short side to `shorter`, no cap."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def center_crop(
    image: np.ndarray, crop: tuple[int, int], *, offset_rounding: Pipeline
) -> np.ndarray:
    """Crop the centre of an (H, W, C) array, padding with zeros where it is smaller.

    A cropped axis starts at `(size - crop) // 2` as in transformers, or at
    `round((size - crop) / 2)` (Python rounding) as in torchvision for the
    original pipeline. A padded axis puts `ceil((crop - size) / 2)` zero rows or
    columns before the image, or the floor of that in the original pipeline.
    """
    out = np.zeros((*crop, image.shape[2]), image.dtype)
    source, target = [], []
    for size, want in zip(image.shape[:2], crop, strict=True):
        if size >= want:
            if offset_rounding == "original":
                start = round((size - want) / 2)
            else:
                start = (size - want) // 2
            source.append(slice(start, start + want))
            target.append(slice(0, want))
        else:
            # transformers centres odd padding one pixel lower than torchvision.
            if offset_rounding == "original":
                before = (want - size) // 2
            else:
                before = math.ceil((want - size) / 2)
            source.append(slice(0, size))
            target.append(slice(before, before + size))
    out[target[0], target[1]] = image[source[0], source[1]]
    return out


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def _array_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(
            f"image {index} is a {array.dtype} array; pass uint8 pixels in [0, 255] "
            "(for floats in [0, 1]: (x * 255).round().astype(np.uint8))."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"image {index} has shape {array.shape}; pass (height, width) or "
            "(height, width, channels) arrays."
        )
    channels = array.shape[2]
    if channels not in (1, 3, 4):
        if array.shape[0] in (1, 3, 4):
            raise ValueError(
                f"image {index} has shape {array.shape}, which looks channels-first; "
                "pass (height, width, channels), e.g. np.moveaxis(image, 0, -1)."
            )
        raise ValueError(
            f"image {index} has {channels} channels; pass 1 (grayscale), 3 (RGB) "
            "or 4 (RGBA)."
        )
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        # The same blend onto white as transformers' convert_to_rgb for arrays.
        alpha = array[..., 3:4] / 255
        blended = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(np.uint8)
    return array


def _warn_if_rotated(image: PIL.Image.Image, index: int) -> None:
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:
        logger.warning(
            "Image %d has EXIF orientation %d and is used as stored, as transformers' "
            "processor does. Pass the file path, or apply PIL.ImageOps.exif_transpose "
            "first, to use the upright image.",
            index,
            orientation,
        )


@dataclasses.dataclass(kw_only=True)
class BridgeTowerImageProcessor:
    """Preprocessor that turns images into BridgeTower's `pixel_values` and `pixel_mask`.

    Field names and defaults are those of transformers' BridgeTowerImageProcessor,
    except `crop_size` (None crops to `size`), `do_convert_rgb` (True, so any
    PIL mode works) and `pipeline` (see the module docstring).
    """

    do_resize: bool = True
    size: int | dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 288})
    size_divisor: int = 32
    resample: int = PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: int | dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN
    image_std: Sequence[float] = OPENAI_CLIP_STD
    do_pad: bool = True
    do_convert_rgb: bool = True
    pipeline: Pipeline = "transformers"
    num_workers: int = dataclasses.field(
        default_factory=lambda: min(4, os.cpu_count() or 1)
    )

    def __post_init__(self):
        self.shortest_edge = _size_value(self.size, "size")
        self.crop_shape = _crop_shape(
            self.shortest_edge if self.crop_size is None else self.crop_size
        )
        if (
            isinstance(self.size_divisor, bool)
            or not isinstance(self.size_divisor, int)
            or self.size_divisor <= 0
        ):
            raise ValueError(
                f"size_divisor must be a positive integer, got {self.size_divisor!r}."
            )
        if self.pipeline not in ("transformers", "original"):
            raise ValueError(
                f"pipeline={self.pipeline!r} is unknown; use 'transformers' (the "
                "Hugging Face processor) or 'original' (the BridgeTower training code)."
            )
        for name in ("image_mean", "image_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(
                    f"{name} must have 3 values (R, G, B), got {len(values)}."
                )
            setattr(self, name, values)
        if 0.0 in self.image_std:
            raise ValueError(f"image_std contains 0: {self.image_std}.")
        try:
            self.resample = PIL.Image.Resampling(self.resample)
        except ValueError:
            raise ValueError(
                f"resample={self.resample!r} is invalid; use a PIL resampling code, "
                "e.g. 3 for bicubic as the BridgeTower checkpoints do."
            ) from None

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], **overrides
    ) -> BridgeTowerImageProcessor:
        """Build from a transformers preprocessor config dict.

        Unknown keys in `values` (other processors' settings) are ignored; an
        unknown override is a TypeError, since it is most likely a typo.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        misspelt = sorted(k for k in overrides if k not in fields)
        if misspelt:
            raise TypeError(
                f"unknown image processor setting(s) {', '.join(misspelt)}; valid "
                f"settings are {', '.join(sorted(fields))}."
            )
        merged = {**values, **overrides}
        unknown = sorted(k for k in merged if k not in fields)
        if unknown:
            logger.debug("Ignoring image processor keys %s", ", ".join(unknown))
        return cls(**{k: v for k, v in merged.items() if k in fields})

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, **overrides
    ) -> BridgeTowerImageProcessor:
        """Load from a checkpoint directory.

        Reads `preprocessor_config.json`, or the `image_processor` entry of
        `processor_config.json` that transformers 5 writes. A directory with only a
        model `config.json` gets the defaults at its `vision_config.image_size`,
        with a warning. Keyword arguments override the file's values.
        """
        directory = Path(path)
        values = _read_image_processor_config(directory)
        if values is None:
            image_size = _model_image_size(directory)
            if image_size is None:
                raise FileNotFoundError(
                    f"{directory} has no {IMAGE_PROCESSOR_FILE}, {PROCESSOR_FILE} or "
                    f"{MODEL_CONFIG_FILE}. Copy preprocessor_config.json from the "
                    "Hugging Face checkpoint, or construct "
                    "BridgeTowerImageProcessor(size=...) directly."
                )
            logger.warning(
                "%s has no %s; using the default preprocessing at image_size %d from "
                "%s.",
                directory,
                IMAGE_PROCESSOR_FILE,
                image_size,
                MODEL_CONFIG_FILE,
            )
            values = {"size": {"shortest_edge": image_size}}
        if (
            "crop_size" not in values
            and "crop_size" not in overrides
            and _size_value(values.get("size", 288), "size") != 288
        ):
            logger.info(
                "%s sets no crop_size, so images are cropped to size as the checkpoint "
                "expects; transformers 5 would crop to 288 instead.",
                directory,
            )
        return cls.from_dict(values, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a transformers-compatible preprocessor config."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "num_workers"
        }
        values["resample"] = int(self.resample)
        values["image_mean"], values["image_std"] = (
            list(self.image_mean),
            list(self.image_std),
        )
        values["crop_size"] = {
            "height": self.crop_shape[0],
            "width": self.crop_shape[1],
        }
        if self.crop_shape[0] == self.crop_shape[1]:
            values["crop_size"] = {"shortest_edge": self.crop_shape[0]}
        values["image_processor_type"] = "BridgeTowerImageProcessor"
        return values

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `preprocessor_config.json` into the directory `path`."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / IMAGE_PROCESSOR_FILE
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return file

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) that an image of this size comes out with."""
        if self.do_center_crop:
            return self.crop_shape
        if self.do_resize:
            return self._resize_target(height, width)
        return height, width

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if self.pipeline == "original":
            return original_resize_shape(height, width, self.shortest_edge)
        return resize_shape(height, width, self.shortest_edge, self.size_divisor)

    def _to_rgb(self, image: ImageInput, index: int) -> PIL.Image.Image | np.ndarray:
        if isinstance(image, (str, os.PathLike, bytes)):
            # A palette file's transparency key survives load_image's RGB conversion
            # in `info`, and the reference composites those pixels onto white.
            decoded = load_image(image)
            return _composite_on_white(decoded) if self.do_convert_rgb else decoded
        if isinstance(image, PIL.Image.Image):
            _warn_if_rotated(image, index)
            if self.do_convert_rgb:
                try:
                    return _composite_on_white(image)
                except (OSError, ValueError) as err:
                    raise ImageFileError(
                        f"cannot convert image {index} (PIL mode {image.mode!r}) to "
                        f"RGB: {err}. Convert it to RGB or L first."
                    ) from None
            if image.mode != "RGB":
                raise ValueError(
                    f"image {index} has PIL mode {image.mode!r}; pass RGB images or "
                    "set do_convert_rgb=True."
                )
            return image
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image, index)
        if hasattr(image, "__array__"):  # jax.Array, torch.Tensor on CPU
            return _array_to_rgb(np.asarray(image), index)
        raise TypeError(
            f"image {index} is a {type(image).__name__}; pass a PIL image, a uint8 "
            "(height, width, 3) array, a file path or encoded bytes."
        )

    def process_one(self, image: ImageInput, index: int = 0) -> np.ndarray:
        """Preprocess one image into a normalised (height, width, 3) float32 array."""
        return self._process_rgb(self._to_rgb(image, index))

    def _process_rgb(self, rgb: PIL.Image.Image | np.ndarray) -> np.ndarray:
        pil = rgb if isinstance(rgb, PIL.Image.Image) else PIL.Image.fromarray(rgb)
        if min(pil.size) < 1:
            raise ValueError(f"an image is empty ({pil.size[0]}x{pil.size[1]}).")
        if self.do_resize:
            height, width = self._resize_target(pil.height, pil.width)
            pil = pil.resize((width, height), resample=self.resample)
        pixels = np.asarray(pil)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_shape, offset_rounding=self.pipeline)
        if self.do_rescale:
            if self.pipeline == "original":  # torchvision ToTensor divides in float32
                pixels = pixels.astype(np.float32) / np.float32(255)
            else:
                pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(
                    np.float32
                )
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            pixels = (pixels - mean) / std
        return pixels

    def __call__(
        self, images: ImageInput | Iterable[ImageInput], *, first_index: int = 0
    ) -> dict[str, np.ndarray]:
        """Preprocess one image or a list of them into a batch.

        Error messages number the images from `first_index`, so a caller that
        splits a long list into batches can report positions in the whole list.

        Returns:
          `{"pixel_values": (batch, height, width, 3) float32,
          "pixel_mask": (batch, height, width) int32}`; the mask is 1 on image
          pixels and 0 on the bottom and right padding added to batch images of
          different sizes.
        """
        if _is_single_image(images):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given; pass at least one image.")
        # PIL images decode lazily and are not thread-safe, and a batch may repeat
        # one image object, so they are converted here, one at a time. Threads
        # then only decode files and resize.
        indices = range(first_index, first_index + len(images))
        images = [
            self._to_rgb(image, i) if isinstance(image, PIL.Image.Image) else image
            for i, image in zip(indices, images, strict=True)
        ]

        def process(image, index):
            if isinstance(image, PIL.Image.Image):
                return self._process_rgb(image)
            return self.process_one(image, index)

        if self.num_workers > 1 and len(images) > 1:
            # PIL releases the GIL while decoding and resizing, so threads help.
            with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
                arrays = list(pool.map(process, images, indices))
        else:
            arrays = [
                process(image, i) for i, image in zip(indices, images, strict=True)
            ]
        return pad_batch(arrays) if self.do_pad else _stack_same_size(arrays)


def _is_single_image(images) -> bool:
    if isinstance(images, (PIL.Image.Image, str, os.PathLike, bytes)):
        return True
    # A (height, width[, channels]) array, tensor or jax.Array is one image.
    return hasattr(images, "__array__") and getattr(images, "ndim", 4) <= 3


def pad_batch(arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Pad (H, W, 3) arrays at the bottom and right to one shape, with a pixel mask."""
    height = max(a.shape[0] for a in arrays)
    width = max(a.shape[1] for a in arrays)
    pixel_values = np.zeros((len(arrays), height, width, 3), np.float32)
    pixel_mask = np.zeros((len(arrays), height, width), np.int32)
    for i, array in enumerate(arrays):
        pixel_values[i, : array.shape[0], : array.shape[1]] = array
        pixel_mask[i, : array.shape[0], : array.shape[1]] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


def _stack_same_size(arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(
            f"images come out in {len(shapes)} sizes ({shapes}) and do_pad is False; "
            "set do_pad=True or do_center_crop=True."
        )
    pixel_values = np.stack(arrays)
    return {
        "pixel_values": pixel_values,
        "pixel_mask": np.ones(pixel_values.shape[:3], np.int32),
    }


def _read_json(file: Path) -> dict:
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file} must contain a JSON object.")
    return values


def _read_image_processor_config(directory: Path) -> dict | None:
    if not directory.is_dir():
        raise FileNotFoundError(f"processor directory not found: {directory}")
    if (directory / IMAGE_PROCESSOR_FILE).is_file():
        return _read_json(directory / IMAGE_PROCESSOR_FILE)
    if (directory / PROCESSOR_FILE).is_file():
        values = _read_json(directory / PROCESSOR_FILE).get("image_processor")
        if isinstance(values, dict):
            return values
    return None


def _model_image_size(directory: Path) -> int | None:
    file = directory / MODEL_CONFIG_FILE
    if not file.is_file():
        return None
    vision = _read_json(file).get("vision_config") or {}
    return vision.get("image_size", 288)


def load_tokenizer(path: str | os.PathLike):
    """Load the RoBERTa tokenizer stored in a checkpoint directory.

    Accepts `tokenizer.json` (what the Hugging Face BridgeTower repositories ship)
    or `vocab.json` with `merges.txt`.

    Raises:
      FileNotFoundError: the directory has neither set of files.
      ValueError: the files do not form a RoBERTa tokenizer with a pad and a
        mask token.
    """
    from transformers import RobertaTokenizerFast

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    has_json = (directory / "tokenizer.json").is_file()
    has_bpe = (directory / "vocab.json").is_file() and (
        directory / "merges.txt"
    ).is_file()
    if not (has_json or has_bpe):
        present = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{directory} has no tokenizer files: expected tokenizer.json, or "
            f"vocab.json and merges.txt, but found {present or 'nothing'}. Copy them "
            "from the Hugging Face checkpoint (python -m convert to-jax copies them "
            "along)."
        )
    try:
        tokenizer = RobertaTokenizerFast.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load the tokenizer in {directory}: {err}") from None
    # transformers rebuilds any tokenizer.json as BPE, so read the stored type.
    model = "BPE"
    if has_json:
        stored = _read_json(directory / "tokenizer.json").get("model")
        model = stored.get("type", "BPE") if isinstance(stored, dict) else "BPE"
    if model != "BPE":
        raise ValueError(
            f"the tokenizer in {directory} is a {model} tokenizer; BridgeTower "
            "needs RoBERTa's byte-level BPE tokenizer (the files that come with "
            "the checkpoint)."
        )
    for name in ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(
                f"the tokenizer in {directory} has no {name.removesuffix('_id')}; "
                "BridgeTower needs RoBERTa's <s>, </s>, <pad> and <mask> tokens."
            )
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], directory: str | os.PathLike, *, vocab_size: int = 1000
):
    """Train a small byte-level BPE tokenizer in RoBERTa's layout and save it.

    The special tokens get RoBERTa's ids (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3,
    `<mask>` 4), so models that follow RoBERTa's pad id of 1 work with it. Meant
    for demos and tests that must run without downloading a vocabulary.
    """
    import tempfile

    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as scratch:
        bpe.save_model(scratch)
        tokenizer = RobertaTokenizerFast(
            vocab=str(Path(scratch) / "vocab.json"),
            merges=str(Path(scratch) / "merges.txt"),
        )
    # RoBERTa's mask token absorbs the space before it, so "a <mask>." encodes
    # as ["a", "<mask>", "."] and a predicted word brings its own space.
    tokenizer.add_special_tokens(
        {"mask_token": AddedToken("<mask>", lstrip=True, special=True)}
    )
    tokenizer.save_pretrained(str(directory))
    return load_tokenizer(directory)


class BridgeTowerProcessor:
    """The image processor paired with the RoBERTa tokenizer, as in transformers.

    `max_text_length` is the longest token sequence the model accepts (its
    position table); `from_pretrained` reads it from `config.json`. Texts longer
    than that are truncated with a warning by default (see `__call__`).
    """

    def __init__(
        self,
        image_processor: BridgeTowerImageProcessor,
        tokenizer,
        *,
        max_text_length: int | None = None,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **image_overrides):
        """Load the image processor, the tokenizer and the model's text limit.

        Raises:
          FileNotFoundError: the directory or its tokenizer files are missing.
          ValueError: the tokenizer does not fit the model in `config.json` (a
            different pad id, or ids beyond the vocabulary).
        """
        directory = Path(path)
        image_processor = BridgeTowerImageProcessor.from_pretrained(
            directory, **image_overrides
        )
        tokenizer = load_tokenizer(directory)
        max_text_length = None
        if (directory / MODEL_CONFIG_FILE).is_file():
            from bt_jax.config import BridgeTowerConfig

            text = BridgeTowerConfig.from_json_file(
                directory / MODEL_CONFIG_FILE
            ).text_config
            max_text_length = text.max_text_length
            _check_tokenizer_fits(tokenizer, text, directory)
        return cls(image_processor, tokenizer, max_text_length=max_text_length)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `preprocessor_config.json` and the tokenizer files into `path`."""
        directory = Path(path)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(str(directory))
        return directory

    @property
    def mask_token(self) -> str:
        return self.tokenizer.mask_token

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    def __call__(
        self,
        images: ImageInput | Iterable[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Preprocess images, texts or both.

        `padding`, `max_length` and `pad_to_multiple_of` mean what they mean for
        transformers tokenizers; padding is on by default so that a batch forms
        one array. `truncation`:

        - None (default): a text longer than `max_length`, or than the model
          allows, is truncated to that length with a warning naming it;
        - True: truncate silently;
        - False: raise ValueError for such a text.

        Returns:
          a dict with `input_ids` and `attention_mask` (batch, length) int32 for
          `text`, and `pixel_values` and `pixel_mask` for `images`.
        """
        if images is None and text is None:
            raise ValueError("pass images=, text= or both.")
        outputs = {}
        if text is not None:
            outputs.update(
                self.tokenize(
                    text,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
            )
        if images is not None:
            outputs.update(self.image_processor(images))
        if text is not None and images is not None:
            texts, pictures = len(outputs["input_ids"]), len(outputs["pixel_values"])
            if texts != pictures:
                raise ValueError(
                    f"got {texts} texts and {pictures} images; BridgeTower scores "
                    "image-text pairs, so pass one image per text (repeat an image "
                    "to pair it with several texts)."
                )
        return outputs

    def tokenize(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Tokenise texts; see `__call__` for the arguments."""
        texts = check_texts(text)
        limit = self._length_limit(max_length)
        kwargs = dict(
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=True,
        )
        if truncation is None and limit is not None:
            truncation = self.warn_long_texts(texts, limit)
        elif truncation is False and limit is not None:
            for i, length in enumerate(self.token_lengths(texts)):
                if length > limit:
                    raise ValueError(
                        f"text {i} ({preview_text(texts[i])!r}) has {length} tokens, more "
                        f"than the limit of {limit}; shorten it or pass truncation=True."
                    )
        if truncation or (padding == "max_length" and max_length is None):
            kwargs["max_length"] = limit
        encoded = self.tokenizer(texts, truncation=bool(truncation), **kwargs)
        try:
            return {
                "input_ids": np.asarray(encoded["input_ids"], np.int32),
                "attention_mask": np.asarray(encoded["attention_mask"], np.int32),
            }
        except ValueError:
            raise ValueError(
                "the texts have different lengths and padding is off; pass "
                "padding=True to batch them."
            ) from None

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Return the token count of each text, special tokens included."""
        return [
            len(ids) for ids in self.tokenizer(list(texts), padding=False)["input_ids"]
        ]

    def warn_long_texts(self, texts: Sequence[str], limit: int) -> bool:
        """Log a warning for each text longer than `limit` tokens; return whether any is."""
        too_long = False
        for i, length in enumerate(self.token_lengths(texts)):
            if length > limit:
                too_long = True
                logger.warning(
                    "text %d (%r) has %d tokens; truncating it to %d.",
                    i,
                    preview_text(texts[i]),
                    length,
                    limit,
                )
        return too_long

    def _length_limit(self, max_length: int | None) -> int | None:
        model_limit = self.max_text_length
        if max_length is None:
            return model_limit
        if model_limit is not None and max_length > model_limit:
            raise ValueError(
                f"max_length={max_length} is more than the model allows "
                f"({model_limit} tokens); pass max_length <= {model_limit}."
            )
        return max_length


def check_texts(text: str | Sequence[str]) -> list[str]:
    """Return the texts as a list; raise for a non-string or an empty text."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise ValueError("no texts given; pass at least one text.")
    for i, value in enumerate(texts):
        if not isinstance(value, str):
            raise TypeError(f"text {i} is a {type(value).__name__}, not a str.")
        if not value.strip():
            raise ValueError(
                f"text {i} is empty ({value!r}); pass a sentence, or leave it out."
            )
    return texts


def preview_text(text: str, width: int = 40) -> str:
    """Shorten a text for log and error messages."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_tokenizer_fits(tokenizer, text_config, directory: Path) -> None:
    if tokenizer.pad_token_id != text_config.pad_token_id:
        raise ValueError(
            f"the tokenizer in {directory} pads with id {tokenizer.pad_token_id} but "
            f"the model's pad_token_id is {text_config.pad_token_id}; use the "
            "tokenizer the checkpoint was trained with."
        )
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's "
            f"vocabulary has {text_config.vocab_size}; use the tokenizer the checkpoint "
            "was trained with."
        )
