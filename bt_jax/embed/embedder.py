"""The `Embedder`: ITC embeddings of image-text pairs, texts and images.

Three embeddings come from the contrastive (ITC) head, each projected to
`contrastive_hidden_size` (512 in the released checkpoints) and L2-normalised:

- joint: the pooled cross-modal output of an (image, text) pair, the head's
  `cross_embeds`. It needs the full model, cross-modal tower included.
- text: the text encoder's CLS token, `text_embeds`; no image needed.
- image: the vision encoder's class token, `image_embeds`; no text needed.

The ITC loss pulls all three towards each other for matching pairs, so a text
query embedded alone can search a store of joint or image embeddings by cosine
similarity.

Batches are padded to a few bucketed shapes (batch to a power of two, text
length to a power of two from 16), so a stream of inputs compiles each function
at most a handful of times. With several local devices the batch is split over
all of them and the parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import numbers
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bt_jax import hub
from bt_jax.inference import (
    as_image_list,
    bucket_size,
    bucketed_tokens,
    check_image_size,
    chunks,
    jit_model_function,
    pad_rows,
)
from bt_jax.modeling import BridgeTowerForContrastiveLearning, BridgeTowerForPreTraining
from bt_jax.processing import BridgeTowerProcessor, ImageInput, check_texts
from bt_jax.processing import pad_batch as pad_images

logger = logging.getLogger(__name__)

KINDS = ("joint", "text", "image")
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class PairEmbeddings:
    """The three ITC embeddings of a batch of pairs, each `(batch, dim)`."""

    joint: np.ndarray
    text: np.ndarray
    image: np.ndarray

    def __getitem__(self, kind: str) -> np.ndarray:
        return getattr(self, kind)


def parse_kinds(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Return the embedding kinds of "joint,text" or ("image",) in canonical order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [name.strip() for name in names if name.strip()]
    unknown = sorted(set(names) - set(KINDS))
    if unknown or not names:
        raise ValueError(
            f"unknown embedding kinds {unknown or names!r}; choose among "
            f"{', '.join(KINDS)}, comma-separated, such as 'joint' or 'joint,text'."
        )
    return tuple(kind for kind in KINDS if kind in names)


def output_dtype(name: str | np.dtype | type) -> np.dtype:
    """Return the NumPy dtype for "float32" or "float16", naming the choices if not."""
    key = np.dtype(name).name if not isinstance(name, str) else name
    if key not in OUTPUT_DTYPES:
        raise ValueError(
            f"embeddings can be stored as {' or '.join(OUTPUT_DTYPES)}, not {name!r}."
        )
    return np.dtype(OUTPUT_DTYPES[key])


class Embedder:
    """Embeds pairs, texts and images with a BridgeTower model's ITC head.

    Construct it with `Embedder.from_pretrained(path)`. Inputs are raw: file
    paths, PIL images or uint8 arrays for images, strings for texts.
    `submit` and `collect` take preprocessed batches instead.

    Args:
      model: a model with the ITC head (`BridgeTowerForContrastiveLearning`, or
        `BridgeTowerForPreTraining` with "itc" among its heads).
      processor: the checkpoint's processor.
      batch_size: most rows run at once. With several devices it is rounded up to
        a multiple of their count.
      dtype: dtype of the returned embeddings, float32 or float16. The model
        computes in its own dtype; the cast comes after normalising.
      devices: devices to split each batch over; by default all local devices.

    NOTE: on GPU and TPU, JAX's default float32 matmul precision is reduced, so
    embeddings there differ from the reference by more than on the CPU. For
    reference parity, set `jax.config.update("jax_default_matmul_precision",
    "highest")` first; the parity tests do so.
    """

    def __init__(
        self,
        model: nnx.Module,
        processor: BridgeTowerProcessor,
        *,
        batch_size: int = 32,
        dtype: str | np.dtype = "float32",
        devices: Sequence[jax.Device] | None = None,
    ):
        _check_itc(model)
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size!r}."
            )
        batch_size = int(batch_size)

        self.model = model
        self.processor = processor
        self.dtype = output_dtype(dtype)
        config = model.config
        check_image_size(
            processor.image_processor, config.vision_config.image_size, "Embedder"
        )
        self.max_text_length = config.text_config.max_text_length
        self.dim = config.contrastive_hidden_size
        self._pad_id = config.text_config.pad_token_id

        self.devices = tuple(devices or jax.local_devices())
        count = len(self.devices)
        self.batch_size = -(-batch_size // count) * count
        if self.batch_size != batch_size:
            logger.info(
                "batch_size %d rounded up to %d, a multiple of the %d devices",
                batch_size,
                self.batch_size,
                count,
            )

        self._mesh = Mesh(np.array(self.devices), ("data",))
        self._rows = NamedSharding(self._mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        self._state = jax.device_put(state, NamedSharding(self._mesh, PartitionSpec()))
        self._jitted: dict[str, Callable] = {}
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Return a digest of the weights, config, tokenizer and image settings.

        An embedding job records it, so that resuming with other weights under
        the same path is rejected instead of mixing two models' rows. Each
        parameter contributes its sum, its sum of squares and a position-weighted
        sum, computed on the device.
        """
        if self._fingerprint is None:

            def summarise(x):
                x = x.astype(jnp.float32).ravel()
                weights = jnp.sin(jnp.arange(x.size, dtype=jnp.float32))
                return jnp.stack([x.sum(), (x * x).sum(), (x * weights).sum()])

            sums = jax.jit(lambda state: jax.tree.map(summarise, state))(self._state)
            digest = hashlib.sha256()
            for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]:
                digest.update(jax.tree_util.keystr(path).encode())
                digest.update(np.asarray(value, np.float32).round(4).tobytes())
            settings = {
                "config": self.model.config.to_dict(),
                "vocab": sorted(self.processor.tokenizer.get_vocab().items()),
                "image_processor": self.processor.image_processor.to_dict(),
            }
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def compute_dtype(self) -> str:
        """The dtype the backbone's matmuls run in, such as "float32"."""
        for _, node in nnx.iter_graph(self.model.bridgetower):
            if isinstance(node, nnx.Linear):
                return np.dtype(node.dtype or np.float32).name
        return "float32"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        compute_dtype=jnp.float32,
        batch_size: int = 32,
        dtype: str | np.dtype = "float32",
        devices: Sequence[jax.Device] | None = None,
        **processor_overrides,
    ) -> Embedder:
        """Load a checkpoint with the ITC head, and its processor and tokenizer.

        Args:
          path: a Hugging Face or bt-jax checkpoint directory with the ITC head,
            such as bridgetower-large-itm-mlm-itc, with its processor files.
          compute_dtype: dtype of the model's matmuls, float32 or bfloat16.
          batch_size, dtype, devices: as for `Embedder`.
          processor_overrides: image processor settings to override.
        """
        heads = hub.stored_heads(path)
        if "itc" not in heads:
            raise ValueError(
                f"{path} stores the heads {heads or 'none'}, and embeddings need the "
                "contrastive (ITC) head; use a checkpoint that has it, such as "
                "bridgetower-large-itm-mlm-itc."
            )
        processor = BridgeTowerProcessor.from_pretrained(path, **processor_overrides)
        model, _ = hub.from_pretrained(
            path, head=hub.checkpoint_head(path), dtype=compute_dtype
        )
        return cls(
            model, processor, batch_size=batch_size, dtype=dtype, devices=devices
        )

    # ------------------------------------------------------------ jitted bodies

    def _function(self, name: str) -> Callable:
        if name not in self._jitted:
            body = getattr(self, f"_{name}_body")
            self._jitted[name] = jit_model_function(self._graphdef, body)
        return self._jitted[name]

    @staticmethod
    def _pairs_body(model, input_ids, attention_mask, pixel_values):
        text, image, joint = model.encode_pairs(input_ids, attention_mask, pixel_values)
        return {"joint": joint, "text": text, "image": image}

    @staticmethod
    def _text_body(model, input_ids, attention_mask):
        return model.encode_text(input_ids, attention_mask)

    @staticmethod
    def _image_body(model, pixel_values):
        return model.encode_image(pixel_values)

    def _call(self, name: str, *arrays: np.ndarray):
        """Run `name` on `arrays` padded to a bucketed batch; returns device arrays.

        The result is not waited for, so the caller can prepare the next batch
        while this one runs. `fetch` turns it into NumPy rows.
        """
        rows = arrays[0].shape[0]
        if rows > self.batch_size:
            raise ValueError(
                f"{rows} rows given; at most batch_size={self.batch_size}."
            )
        batch = max(bucket_size(rows, maximum=self.batch_size), len(self.devices))
        batch = -(-batch // len(self.devices)) * len(self.devices)
        padded = [jax.device_put(pad_rows(a, batch), self._rows) for a in arrays]
        return rows, self._function(name)(self._state, *padded)

    def fetch(self, pending) -> np.ndarray | dict[str, np.ndarray]:
        """Wait for a `_call` result and return its rows in the output dtype."""
        rows, output = pending
        return jax.tree.map(
            lambda x: np.asarray(x, np.float32)[:rows].astype(self.dtype), output
        )

    # ------------------------------------------------------- preprocessed input

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise texts, truncating to the model's limit, padded to a length bucket."""
        return bucketed_tokens(
            self.processor, texts, pad_id=self._pad_id, limit=self.max_text_length
        )

    def pixels(self, images: Sequence[ImageInput], first_index: int = 0) -> np.ndarray:
        """Preprocess images into `(batch, height, width, 3)` pixel values."""
        return self.processor.image_processor(list(images), first_index=first_index)[
            "pixel_values"
        ]

    def submit(self, kinds: Sequence[str], input_ids, attention_mask, pixel_values):
        """Start embedding one preprocessed batch of at most `batch_size` rows.

        Returns a handle for `collect`. Only the passes `kinds` needs run: the
        full model for "joint", the uni-modal encoders otherwise.
        """
        kinds = parse_kinds(kinds)
        if "joint" in kinds:
            return (
                "pairs",
                self._call("pairs", input_ids, attention_mask, pixel_values),
            )
        handles = {}
        if "text" in kinds:
            handles["text"] = self._call("text", input_ids, attention_mask)
        if "image" in kinds:
            handles["image"] = self._call("image", pixel_values)
        return ("parts", handles)

    def collect(self, handle) -> dict[str, np.ndarray]:
        """Wait for a `submit` handle; return `{kind: (rows, dim)}` for its kinds."""
        mode, pending = handle
        if mode == "pairs":
            return self.fetch(pending)
        return {kind: self.fetch(part) for kind, part in pending.items()}

    # ---------------------------------------------------------------- raw input

    def embed_pairs(
        self, images: Sequence[ImageInput], texts: Sequence[str]
    ) -> PairEmbeddings:
        """Return the joint, text and image embeddings of `(images[i], texts[i])`."""
        images = as_image_list(images)
        texts = self._texts(texts)
        if len(images) != len(texts):
            raise ValueError(
                f"{len(images)} images and {len(texts)} texts given; pass one text "
                "per image."
            )
        parts = []
        for part in chunks(len(texts), self.batch_size):
            ids, mask = self.tokens(texts[part])
            pixels = self.pixels(images[part], part.start)
            parts.append(self.fetch(self._call("pairs", ids, mask, pixels)))
        return PairEmbeddings(
            **{kind: _concatenate([p[kind] for p in parts], self) for kind in KINDS}
        )

    def embed_joint(
        self, images: Sequence[ImageInput], texts: Sequence[str]
    ) -> np.ndarray:
        """Return the joint (cross-modal) embeddings of `(images[i], texts[i])`."""
        return self.embed_pairs(images, texts).joint

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Return the text embeddings `(len(texts), dim)`; a string counts as one text."""
        texts = self._texts(texts)
        parts = []
        for part in chunks(len(texts), self.batch_size):
            ids, mask = self.tokens(texts[part])
            parts.append(self.fetch(self._call("text", ids, mask)))
        return _concatenate(parts, self)

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Return the image embeddings `(len(images), dim)`."""
        images = as_image_list(images)
        parts = []
        for part in chunks(len(images), self.batch_size):
            pixels = self.pixels(images[part], part.start)
            parts.append(self.fetch(self._call("image", pixels)))
        return _concatenate(parts, self)

    def _texts(self, texts) -> list[str]:
        """Check texts, warning about each one longer than the model's limit."""
        texts = check_texts(texts if isinstance(texts, str) else list(texts))
        self.processor.warn_long_texts(texts, self.max_text_length)
        return texts


def pad_pixels(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack preprocessed images, padding different sizes at the bottom and right."""
    return pad_images(list(arrays))["pixel_values"]


def _check_itc(model: nnx.Module) -> None:
    if isinstance(model, BridgeTowerForContrastiveLearning):
        return
    if isinstance(model, BridgeTowerForPreTraining) and "itc" in model.heads:
        return
    raise TypeError(
        f"{type(model).__name__} has no contrastive (ITC) head, which embeddings "
        "need; load the model with head='itc' or a head list that includes it."
    )


def _concatenate(parts: list[np.ndarray], embedder: Embedder) -> np.ndarray:
    if not parts:
        return np.zeros((0, embedder.dim), embedder.dtype)
    return np.concatenate(parts)
