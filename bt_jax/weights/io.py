"""Read PyTorch checkpoint files as NumPy arrays, and write safetensors.

Supported layouts of a Hugging Face checkpoint directory, in the order they are
looked for:

- `model.safetensors`
- `model.safetensors.index.json` with the shards it names
- `pytorch_model.bin`
- `pytorch_model.bin.index.json` with the shards it names

safetensors are read without torch, one tensor at a time. `.bin` files need torch
and are opened with `torch.load(..., weights_only=True)`, which never
runs code from the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointFileError(ValueError):
    """A weight file is missing, truncated or unreadable."""


class TensorSource(Mapping[str, np.ndarray]):
    """Read-only mapping from state-dict key to tensor, loaded lazily.

    `shapes` and `dtypes` describe every tensor without reading its data.
    """

    def __init__(self, description: str):
        self.description = description
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsSource(TensorSource):
    def __init__(
        self, files: Mapping[str, list[str]] | None, paths: list[Path], description: str
    ):
        super().__init__(description)
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for path in paths:
            handle = _open_safetensors(path)
            self._handles[path] = handle
            keys = handle.keys()  # a safe_open handle is not iterable itself
            for key in keys:
                if key in self._file_of:
                    raise CheckpointFileError(
                        f"tensor {key!r} is stored in both {self._file_of[key].name} and "
                        f"{path.name}; the shards overlap. Re-export the checkpoint."
                    )
                tensor_slice = handle.get_slice(key)
                self._file_of[key] = path
                self.shapes[key] = tuple(tensor_slice.get_shape())
                self.dtypes[key] = np.dtype(
                    _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), np.void)
                )
        if files is not None:
            _check_index(files, self._file_of, description)

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._file_of[key]
        try:
            return self._handles[path].get_tensor(key)
        except SafetensorError as err:
            raise CheckpointFileError(
                f"cannot read tensor {key!r} from {path}: {err}. The file may be corrupt; "
                "re-download or re-export it."
            ) from None

    def close(self) -> None:
        self._handles.clear()


class TorchSource(TensorSource):
    def __init__(
        self, files: Mapping[str, list[str]] | None, paths: list[Path], description: str
    ):
        super().__init__(description)
        self._tensors = {}
        file_of: dict[str, Path] = {}
        for path in paths:
            for key, tensor in _load_torch_file(path).items():
                if key in self._tensors:
                    raise CheckpointFileError(
                        f"tensor {key!r} is stored in both {file_of[key].name} and "
                        f"{path.name}; the shards overlap. Re-export the checkpoint."
                    )
                self._tensors[key] = tensor
                file_of[key] = path
                self.shapes[key] = tuple(tensor.shape)
                self.dtypes[key] = _torch_to_numpy_dtype(tensor.dtype)
        if files is not None:
            _check_index(files, file_of, description)

    def __getitem__(self, key: str) -> np.ndarray:
        return torch_tensor_to_numpy(self._tensors[key])

    def close(self) -> None:
        self._tensors.clear()


def find_weight_files(directory: Path) -> list[str]:
    """Return the names from WEIGHT_FILES present in `directory`."""
    return [name for name in WEIGHT_FILES if (directory / name).is_file()]


def open_checkpoint(directory: str | os.PathLike) -> TensorSource:
    """Open the weights of a Hugging Face checkpoint directory.

    Raises:
      FileNotFoundError: the directory or its weight files do not exist.
      CheckpointFileError: a file is truncated, corrupt or inconsistent with its index.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    present = find_weight_files(directory)
    if not present:
        raise FileNotFoundError(
            f"no weights found in {directory}: expected one of {', '.join(WEIGHT_FILES)}. "
            "Save the PyTorch model with model.save_pretrained(directory)."
        )
    name = present[0]
    path = directory / name
    if name == SAFETENSORS:
        return SafetensorsSource(None, [path], str(path))
    if name == SAFETENSORS_INDEX:
        files = _read_index(path)
        return SafetensorsSource(files, _shard_paths(directory, files, path), str(path))
    if name == TORCH_BIN:
        return TorchSource(None, [path], str(path))
    files = _read_index(path)
    return TorchSource(files, _shard_paths(directory, files, path), str(path))


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except SafetensorError as err:
        size = path.stat().st_size
        raise CheckpointFileError(
            f"{path} is not a readable safetensors file ({err}; {size} bytes on disk). "
            "It is probably truncated or corrupt: re-download or re-export it."
        ) from None


def _read_index(path: Path) -> dict[str, list[str]]:
    """Return shard file name -> keys from a `*.index.json`."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointFileError(
            f"{path} is not a valid checkpoint index (needs a 'weight_map' object): {err!r}"
        ) from None
    files: dict[str, list[str]] = {}
    for key, file_name in weight_map.items():
        files.setdefault(file_name, []).append(key)
    return files


def _invert(files: Mapping[str, list[str]]) -> dict[str, str]:
    return {key: name for name, keys in files.items() for key in keys}


def _shard_paths(
    directory: Path, files: Mapping[str, list[str]], index: Path
) -> list[Path]:
    paths = []
    for name in sorted(files):
        shard = directory / name
        if not shard.is_file():
            raise FileNotFoundError(
                f"shard {name} listed in {index.name} is missing from {directory}; "
                "download or copy every shard the index names."
            )
        paths.append(shard)
    return paths


def _check_index(
    files: Mapping[str, list[str]], file_of: Mapping[str, Path], description: str
) -> None:
    expected = _invert(files)
    missing = sorted(k for k in expected if k not in file_of)
    misplaced = sorted(
        k for k, name in expected.items() if k in file_of and file_of[k].name != name
    )
    if missing or misplaced:
        details = [
            f"  {k}: listed in {expected[k]} but not found there" for k in missing
        ]
        details += [
            f"  {k}: listed in {expected[k]} but stored in {file_of[k].name}"
            for k in misplaced
        ]
        raise CheckpointFileError(
            f"{description} does not match its shards:\n" + "\n".join(details)
        )


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading pytorch_model.bin needs PyTorch; install it with "
            "`pip install torch==2.13.0` (CPU build), or convert the checkpoint to "
            "safetensors first."
        ) from None
    return torch


def _load_torch_file(path: Path) -> dict:
    torch = _import_torch()
    try:
        # torch can memory-map only the zip format (the default since torch 1.6);
        # older files are read whole.
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # torch raises RuntimeError, pickle errors and more
        reason = str(err).rstrip(".")
        raise CheckpointFileError(
            f"cannot load {path} with torch.load(weights_only=True): {reason}. The file may be "
            "truncated or corrupt, or contain objects other than tensors."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointFileError(
            f"{path} does not contain a state dict (a mapping of names to tensors)."
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointFileError(
            f"{path} contains non-tensor entries {not_tensors[:5]}; expected a plain state dict."
        )
    return state


def _torch_to_numpy_dtype(dtype) -> np.dtype:
    torch = _import_torch()
    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty((), dtype=dtype).numpy().dtype


def torch_tensor_to_numpy(tensor) -> np.ndarray:
    """Copy a CPU tensor to NumPy, bfloat16 included (NumPy has no native bfloat16)."""
    torch = _import_torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def write_safetensors(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike
) -> None:
    """Write `tensors` as one safetensors file that transformers' from_pretrained reads."""
    arrays = {key: np.asarray(value, order="C") for key, value in tensors.items()}
    # transformers rejects safetensors files whose metadata lacks a known format.
    save_file(arrays, str(path), metadata={"format": "pt"})
