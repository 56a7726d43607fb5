"""Inference for notebooks and scripts: matching, similarity, retrieval, fill-mask,
and the answers of fine-tuned VQA, NLVR2 and SNLI-VE models.

`Predictor` wraps a model and its processor. It takes raw inputs (PIL images,
arrays, file paths, strings), preprocesses them on the host, and runs jitted
functions on batches padded to a few bucketed shapes. The batch is padded to a
power of two up to `batch_size`, and the text length to a power of two from 16
up to the model's limit. So calls with other numbers of inputs or other text lengths
inside a bucket reuse compiled code instead of compiling again.

Retrieval works as the original BridgeTower evaluation does: contrastive (ITC)
similarity picks `candidates` per query from the whole gallery, then the
image-text matching (ITM) head re-scores those pairs, ranked by the logit of
the "match" class. Gallery embeddings are computed once per `Gallery`, so a
gallery searched many times is embedded once.

Which methods work depends on the heads the checkpoint stores:

| method                               | needs |
|--------------------------------------|-------|
| `match`, `match_matrix`              | itm   |
| `similarity`, `encode_*`, `index_*`  | itc   |
| `retrieve_*`                         | itc, or itm alone (every pair is scored) |
| `fill_mask`                          | mlm   |
| `answer`                             | vqa   |
| `nlvr2`                              | nlvr2 |
| `entailment`                         | snli-ve |
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bt_jax import compiler, hub
from bt_jax.modeling import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerForNLVR2,
    BridgeTowerForPreTraining,
    BridgeTowerForVisualEntailment,
    BridgeTowerForVisualQuestionAnswering,
)
from bt_jax.processing import (
    BridgeTowerProcessor,
    ImageInput,
    check_texts,
    preview_text,
)

logger = logging.getLogger(__name__)

MIN_TEXT_BUCKET = 16
# Galleries built from plain lists are kept for repeated searches, up to this many.
GALLERY_CACHE_SIZE = 4


@dataclasses.dataclass(frozen=True)
class Match:
    """One retrieved gallery item.

    `score` orders the results: the ITM match logit when the results were
    re-ranked, else the ITC cosine similarity.
    """

    index: int
    id: str
    score: float
    similarity: float | None = None
    match_probability: float | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One class of a fine-tuned head (a VQA answer, an SNLI-VE label)."""

    label: str
    probability: float


@dataclasses.dataclass(frozen=True)
class MaskPrediction:
    """One candidate token for a `<mask>` position."""

    token_id: int
    token: str
    probability: float
    sequence: str


@dataclasses.dataclass
class Gallery:
    """Embedded images or texts to search, with the inputs kept for re-ranking."""

    kind: str  # "image" or "text"
    items: list[Any]
    ids: list[str]
    embeddings: np.ndarray  # (len(items), dim), L2-normalised

    def __len__(self) -> int:
        return len(self.items)


def bucket_size(n: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return the smallest power of two >= `n` and >= `minimum`, capped at `maximum`."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return size if maximum is None else min(size, maximum)


def jit_model_function(graphdef, body: Callable) -> Callable:
    """Jit `body(model, *args)` as a function of the model's state and `args`."""

    def run(state, *args):
        return body(nnx.merge(graphdef, state), *args)

    return jax.jit(run, compiler_options=compiler.compiler_options())


def bucketed_tokens(
    processor: BridgeTowerProcessor, texts: Sequence[str], *, pad_id: int, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise (truncating silently to `limit`) and pad to the length's bucket.

    The bucket is a power of two from `MIN_TEXT_BUCKET` up to `limit`.
    """
    encoded = processor.tokenize(list(texts), padding=True, truncation=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    length = bucket_size(ids.shape[1], minimum=MIN_TEXT_BUCKET, maximum=limit)
    padded_ids = np.full((ids.shape[0], length), pad_id, np.int32)
    padded_mask = np.zeros((ids.shape[0], length), np.int32)
    padded_ids[:, : ids.shape[1]] = ids
    padded_mask[:, : ids.shape[1]] = mask
    return padded_ids, padded_mask


def chunks(n: int, size: int) -> Iterator[slice]:
    """Yield the slices that cut `n` rows into runs of at most `size`."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def pad_rows(array: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """Pad `array` along its first axis to `rows` rows of `fill`."""
    if array.shape[0] == rows:
        return array
    pad = np.full((rows - array.shape[0], *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])


def _heads_of(model: nnx.Module) -> tuple[str, ...]:
    if isinstance(model, BridgeTowerForPreTraining):
        return model.heads
    for cls, head in (
        (BridgeTowerForMaskedLM, "mlm"),
        (BridgeTowerForImageAndTextRetrieval, "itm"),
        (BridgeTowerForContrastiveLearning, "itc"),
        (BridgeTowerForVisualQuestionAnswering, "vqa"),
        (BridgeTowerForNLVR2, "nlvr2"),
        (BridgeTowerForVisualEntailment, "snli-ve"),
    ):
        if isinstance(model, cls):
            return (head,)
    raise TypeError(
        f"{type(model).__name__} has no task head; load the model with a head, e.g. "
        "Predictor.from_pretrained(path), which keeps every head the checkpoint stores."
    )


class Predictor:
    """Runs a BridgeTower model on raw images and texts.

    Construct it with `Predictor.from_pretrained(path)`, which loads the model with
    every head the checkpoint stores, and the processor from the same directory.
    """

    def __init__(
        self,
        model: nnx.Module,
        processor: BridgeTowerProcessor,
        *,
        batch_size: int = 16,
        progress: bool = True,
    ):
        _check_count("batch_size", batch_size)
        self.model = model
        self.processor = processor
        self.heads = _heads_of(model)
        self.batch_size = batch_size
        self.progress = progress
        config = model.config
        self.max_text_length = config.text_config.max_text_length
        if processor.max_text_length is None:
            processor.max_text_length = self.max_text_length
        self._pad_id = config.text_config.pad_token_id
        check_image_size(processor.image_processor, config.vision_config.image_size)
        self._graphdef, self._state = nnx.split(model)
        self._jitted: dict[str, Callable] = {}
        self._galleries: collections.OrderedDict[str, Gallery] = (
            collections.OrderedDict()
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        head: str | None = None,
        dtype=jnp.float32,
        batch_size: int = 16,
        progress: bool = True,
        **processor_overrides,
    ) -> Predictor:
        """Load a checkpoint directory with its processor and tokenizer files.

        Args:
          path: a Hugging Face BridgeTower directory or a bt-jax directory, with
            `preprocessor_config.json` and tokenizer files beside the weights.
          head: heads to load, such as "itm" or "mlm+itm+itc"; by default every
            head whose weights the checkpoint stores.
          dtype: compute dtype (float32, or bfloat16 for speed).
          batch_size: largest batch run at once; bigger inputs are split.
          progress: show progress bars for inputs longer than one batch.
          processor_overrides: image processor settings to override, such as
            `pipeline="original"`.
        """
        if head == "model":
            raise ValueError(
                "head='model' has no task head; pass head=None (every head the "
                "checkpoint stores) or heads among mlm, itm and itc."
            )
        if head is None:
            head = hub.checkpoint_head(path)
            if head == "model":
                raise ValueError(
                    f"{path} stores no task head (MLM, ITM, ITC or a fine-tuned one), "
                    "and the Predictor needs at least one; use a checkpoint with "
                    "heads, such as bridgetower-large-itm-mlm-itc."
                )
        processor = BridgeTowerProcessor.from_pretrained(path, **processor_overrides)
        model, _ = hub.from_pretrained(path, head=head, dtype=dtype)
        logger.info("Loaded %s with the %s head(s)", path, head)
        return cls(model, processor, batch_size=batch_size, progress=progress)

    # ----------------------------------------------------------------- plumbing

    def _require(self, head: str, task: str) -> None:
        if head not in self.heads:
            raise ValueError(
                f"{task} needs the {head} head, but this model has "
                f"{'+'.join(self.heads)}; load a checkpoint that stores it."
            )

    def _function(self, name: str) -> Callable:
        """Return the jitted function `name`, built on first use."""
        if name not in self._jitted:
            body = getattr(self, f"_{name}_body")
            self._jitted[name] = jit_model_function(self._graphdef, body)
        return self._jitted[name]

    @staticmethod
    def _itm_body(model, input_ids, attention_mask, pixel_values):
        if isinstance(model, BridgeTowerForPreTraining):
            logits = model(input_ids, attention_mask, pixel_values, heads="itm")
            return logits.itm_logits
        return model(input_ids, attention_mask, pixel_values).logits

    @staticmethod
    def _mlm_body(model, input_ids, attention_mask, pixel_values, top_k):
        if isinstance(model, BridgeTowerForPreTraining):
            logits = model(input_ids, attention_mask, pixel_values, heads="mlm")
            logits = logits.mlm_logits
        else:
            logits = model(input_ids, attention_mask, pixel_values).logits
        probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jax.lax.top_k(probabilities, top_k.shape[0])

    @staticmethod
    def _classify_body(model, input_ids, attention_mask, pixel_values):
        return model(input_ids, attention_mask, pixel_values).logits

    @staticmethod
    def _nlvr2_body(model, input_ids, attention_mask, pixel_values, pixel_values_2):
        return model(input_ids, attention_mask, pixel_values, pixel_values_2).logits

    @staticmethod
    def _text_embeds_body(model, input_ids, attention_mask):
        return model.encode_text(input_ids, attention_mask)

    @staticmethod
    def _image_embeds_body(model, pixel_values):
        return model.encode_image(pixel_values)

    def _texts(self, texts: str | Iterable[str]) -> list[str]:
        """Check texts once, warning about each one the model must truncate.

        Batches are then tokenised with silent truncation, so a text paired with
        many images is reported once, by its position in `texts`.
        """
        texts = check_texts(texts if isinstance(texts, str) else list(texts))
        self.processor.warn_long_texts(texts, self.max_text_length)
        return texts

    def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise (truncating silently) and pad the length to its bucket."""
        return bucketed_tokens(
            self.processor, texts, pad_id=self._pad_id, limit=self.max_text_length
        )

    def _pixels(self, images: Sequence[ImageInput], first_index: int) -> np.ndarray:
        processed = self.processor.image_processor(
            list(images), first_index=first_index
        )
        return processed["pixel_values"]

    def _batches(self, n: int, description: str) -> Iterator[slice]:
        parts = list(chunks(n, self.batch_size))
        show = self.progress and len(parts) > 1
        return iter(tqdm(parts, desc=description, unit="batch", disable=not show))

    def _run(self, name: str, rows: int, *arrays: np.ndarray, **static):
        """Run jitted function `name` on `arrays` padded to a bucketed batch size."""
        batch = bucket_size(rows, maximum=self.batch_size)
        padded = [pad_rows(a, batch) for a in arrays]
        extra = [np.zeros((static["top_k"],), np.int8)] if "top_k" in static else []
        output = self._function(name)(self._state, *padded, *extra)
        return jax.tree.map(lambda x: np.asarray(x)[:rows], output)

    # -------------------------------------------------------------- embeddings

    def encode_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Return L2-normalised ITC text embeddings, `(len(texts), dim)` float32."""
        self._require("itc", "encode_texts")
        return self._encode_texts(self._texts(texts))

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        outputs = []
        for part in self._batches(len(texts), "Embedding texts"):
            ids, mask = self._tokens(texts[part])
            outputs.append(self._run("text_embeds", len(ids), ids, mask))
        return np.concatenate(outputs).astype(np.float32)

    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Return L2-normalised ITC image embeddings, `(len(images), dim)` float32."""
        self._require("itc", "encode_images")
        images = as_image_list(images)
        outputs = []
        for part in self._batches(len(images), "Embedding images"):
            pixels = self._pixels(images[part], part.start)
            outputs.append(self._run("image_embeds", len(pixels), pixels))
        return np.concatenate(outputs).astype(np.float32)

    def index_images(
        self, images: Sequence[ImageInput], ids: Sequence[str] | None = None
    ) -> Gallery:
        """Embed images once into a `Gallery` to search with `retrieve_images`.

        NOTE: the gallery keeps the inputs, not their pixels, so ITM re-ranking
        decodes and resizes each candidate image again for every query.
        """
        images = as_image_list(images)
        embeddings = (
            self.encode_images(images)
            if "itc" in self.heads
            else np.zeros((len(images), 0), np.float32)
        )
        return Gallery("image", images, _gallery_ids(images, ids), embeddings)

    def index_texts(
        self, texts: Sequence[str], ids: Sequence[str] | None = None
    ) -> Gallery:
        """Embed texts once into a `Gallery` to search with `retrieve_texts`."""
        texts = self._texts(texts)
        embeddings = (
            self._encode_texts(texts)
            if "itc" in self.heads
            else np.zeros((len(texts), 0), np.float32)
        )
        return Gallery("text", texts, _gallery_ids(texts, ids), embeddings)

    def _cached_gallery(self, kind: str, items: list) -> Gallery:
        """Return the gallery of `items`, embedding them only if not seen recently."""
        index = self.index_images if kind == "image" else self.index_texts
        fingerprint = _fingerprint(items)
        if fingerprint is None:
            return index(items)
        key = f"{kind}:{fingerprint}"
        if key in self._galleries:
            self._galleries.move_to_end(key)
            return self._galleries[key]
        gallery = index(items)
        self._galleries[key] = gallery
        if len(self._galleries) > GALLERY_CACHE_SIZE:
            self._galleries.popitem(last=False)
        return gallery

    def similarity(
        self,
        images: ImageInput | Sequence[ImageInput] | Gallery,
        texts: str | Sequence[str] | Gallery,
    ) -> np.ndarray:
        """Return the ITC cosine similarity of every image with every text, `(I, T)`."""
        self._require("itc", "similarity")
        if isinstance(images, Gallery):
            _check_kind(images, "image", "similarity's first argument")
        if isinstance(texts, Gallery):
            _check_kind(texts, "text", "similarity's second argument")
        image_embeds = (
            images.embeddings
            if isinstance(images, Gallery)
            else self.encode_images(images)
        )
        text_embeds = (
            texts.embeddings if isinstance(texts, Gallery) else self.encode_texts(texts)
        )
        return image_embeds @ text_embeds.T

    # ----------------------------------------------------------------- matching

    def match_logits(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
    ) -> np.ndarray:
        """Return the ITM logits `(N, 2)` of pairs (images[i], texts[i]).

        A single image or a single text is paired with every item of the other.
        """
        self._require("itm", "match")
        images, texts = _pairs(as_image_list(images), self._texts(texts))
        return self._match_logits(images, texts)

    def _match_logits(self, images: list, texts: list[str]) -> np.ndarray:
        outputs = []
        for part in self._batches(len(texts), "Matching"):
            ids, mask = self._tokens(texts[part])
            pixels = self._pixels(images[part], part.start)
            outputs.append(self._run("itm", len(ids), ids, mask, pixels))
        return np.concatenate(outputs).astype(np.float32)

    # ------------------------------------------------------- fine-tuned heads

    def answer(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        *,
        top_k: int = 3,
    ) -> list[list[Prediction]]:
        """Return the `top_k` answers of a VQA model to (images[i], questions[i]).

        A single image or question is paired with every item of the other. An
        answer's probability is the sigmoid of its logit: the head is trained
        with one binary target per answer, so they need not sum to 1.
        """
        self._require("vqa", "answer")
        _check_count("top_k", top_k)
        logits = self._classify(images, questions, "Answering")
        return self._top_labels(jax.nn.sigmoid(logits), top_k)

    def entailment(
        self,
        images: ImageInput | Sequence[ImageInput],
        hypotheses: str | Sequence[str],
    ) -> list[dict[str, float]]:
        """Return an SNLI-VE model's class probabilities for (images[i], hypotheses[i])."""
        self._require("snli-ve", "entailment")
        probabilities = jax.nn.softmax(
            self._classify(images, hypotheses, "Classifying"), axis=-1
        )
        return [
            {label: float(row[index]) for index, label in self._labels().items()}
            for row in np.asarray(probabilities)
        ]

    def nlvr2(
        self,
        left_images: ImageInput | Sequence[ImageInput],
        right_images: ImageInput | Sequence[ImageInput],
        sentences: str | Sequence[str],
    ) -> np.ndarray:
        """Return the probability that sentences[i] is true of the image pair i, `(N,)`."""
        self._require("nlvr2", "nlvr2")
        left, sentences = _pairs(as_image_list(left_images), self._texts(sentences))
        right, _ = _pairs(as_image_list(right_images), sentences)
        if len(right) != len(left):
            raise ValueError(
                f"got {len(left)} left and {len(right)} right images for "
                f"{len(sentences)} sentences; give one pair per sentence."
            )
        outputs = []
        for part in self._batches(len(sentences), "Classifying"):
            ids, mask = self._tokens(sentences[part])
            pixels = self._pixels(left[part], part.start)
            pixels_2 = self._pixels(right[part], part.start)
            outputs.append(self._run("nlvr2", len(ids), ids, mask, pixels, pixels_2))
        logits = np.concatenate(outputs).astype(np.float32)
        return np.asarray(jax.nn.softmax(logits, axis=-1))[:, 1]

    def _classify(self, images, texts, description: str) -> np.ndarray:
        images, texts = _pairs(as_image_list(images), self._texts(texts))
        outputs = []
        for part in self._batches(len(texts), description):
            ids, mask = self._tokens(texts[part])
            pixels = self._pixels(images[part], part.start)
            outputs.append(self._run("classify", len(ids), ids, mask, pixels))
        return np.concatenate(outputs).astype(np.float32)

    def _labels(self) -> dict[int, str]:
        config = self.model.config
        if config.id2label is not None:
            return config.id2label
        return {index: f"class_{index}" for index in range(3)}

    def _top_labels(self, scores, top_k: int) -> list[list[Prediction]]:
        labels = self._labels()
        scores = np.asarray(scores)
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
        return [
            [Prediction(labels[int(index)], float(row[index])) for index in order]
            for row, order in zip(scores, top, strict=True)
        ]

    def match(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
    ) -> np.ndarray:
        """Return the probability that texts[i] describes images[i], `(N,)`."""
        return _match_probability(self.match_logits(images, texts))

    def match_matrix(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
    ) -> np.ndarray:
        """Return the ITM match probability of every image with every text, `(I, T)`.

        Runs the cross-modal model on all I x T pairs; for large sets use
        `retrieve_*`, which scores only the contrastive candidates.
        """
        self._require("itm", "match_matrix")
        images = as_image_list(images)
        texts = self._texts(texts)
        pairs_images = [image for image in images for _ in texts]
        pairs_texts = [text for _ in images for text in texts]
        logits = self._match_logits(pairs_images, pairs_texts)
        return _match_probability(logits).reshape(len(images), len(texts))

    # ---------------------------------------------------------------- retrieval

    def retrieve_texts(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: Sequence[str] | Gallery,
        *,
        k: int = 5,
        candidates: int = 16,
        rerank: bool = True,
    ) -> list[list[Match]]:
        """Return the `k` best texts for each image, best first.

        Args:
          images: the queries.
          texts: the gallery, as a list or as a `Gallery` from `index_texts`.
          k: results per query.
          candidates: texts per query that ITM re-scores after the ITC search.
          rerank: re-score with ITM (needs the itm head); False ranks by ITC.
        """
        _check_counts(k=k, candidates=candidates)
        if isinstance(texts, Gallery):
            gallery = texts
        else:
            gallery = self._cached_gallery("text", _gallery_items(texts, "texts"))
        _check_kind(gallery, "text", "retrieve_texts")
        queries = as_image_list(images)
        query_embeds = (
            self.encode_images(queries) if gallery.embeddings.shape[1] else None
        )
        return self._retrieve(
            queries, query_embeds, gallery, k, candidates, rerank, images_first=True
        )

    def retrieve_images(
        self,
        texts: str | Sequence[str],
        images: Sequence[ImageInput] | Gallery,
        *,
        k: int = 5,
        candidates: int = 16,
        rerank: bool = True,
    ) -> list[list[Match]]:
        """Return the `k` best images for each text, best first.

        The arguments mirror `retrieve_texts`, with texts as the queries.
        """
        _check_counts(k=k, candidates=candidates)
        if isinstance(images, Gallery):
            gallery = images
        else:
            gallery = self._cached_gallery("image", _gallery_items(images, "images"))
        _check_kind(gallery, "image", "retrieve_images")
        queries = self._texts(texts)
        query_embeds = (
            self._encode_texts(queries) if gallery.embeddings.shape[1] else None
        )
        return self._retrieve(
            queries, query_embeds, gallery, k, candidates, rerank, images_first=False
        )

    def _retrieve(
        self,
        queries: list,
        query_embeds: np.ndarray | None,
        gallery: Gallery,
        k: int,
        candidates: int,
        rerank: bool,
        *,
        images_first: bool,
    ) -> list[list[Match]]:
        if not len(gallery):
            raise ValueError("the gallery is empty; index at least one item.")
        if "itc" not in self.heads and "itm" not in self.heads:
            raise ValueError(
                f"retrieval needs the itc or itm head, but this model has "
                f"{'+'.join(self.heads)}."
            )
        k = min(k, len(gallery))
        if rerank and "itm" not in self.heads:
            logger.info("No ITM head: ranking by ITC similarity without re-ranking.")
        rerank = rerank and "itm" in self.heads
        if query_embeds is None:
            if not rerank:
                raise ValueError(
                    "rerank=False ranks by ITC similarity, but this model has no itc "
                    "head; pass rerank=True to score every pair with ITM."
                )
            logger.warning(
                "No ITC head: scoring all %d x %d pairs with ITM.",
                len(queries),
                len(gallery),
            )
            similarity = np.zeros((len(queries), len(gallery)), np.float32)
            shortlist = np.tile(np.arange(len(gallery)), (len(queries), 1))
        else:
            similarity = query_embeds @ gallery.embeddings.T
            width = max(k, min(candidates, len(gallery))) if rerank else k
            # Stable sort, so ties keep gallery order.
            shortlist = np.argsort(-similarity, axis=1, kind="stable")[:, :width]

        logits = None
        if rerank:
            pair_queries = [
                queries[q] for q in range(len(queries)) for _ in shortlist[q]
            ]
            pair_items = [gallery.items[i] for row in shortlist for i in row]
            if images_first:
                logits = self._match_logits(pair_queries, pair_items)
            else:
                logits = self._match_logits(pair_items, pair_queries)
            logits = logits.reshape(*shortlist.shape, 2)

        results = []
        for q, row in enumerate(shortlist):
            if logits is None:
                order = np.arange(len(row))
                scores = similarity[q, row]
            else:
                scores = logits[q, :, 1]
                order = np.argsort(-scores, kind="stable")
            matches = []
            for position in order[:k]:
                index = int(row[position])
                matches.append(
                    Match(
                        index=index,
                        id=gallery.ids[index],
                        score=float(scores[position]),
                        similarity=None
                        if query_embeds is None
                        else float(similarity[q, index]),
                        match_probability=None
                        if logits is None
                        else float(_match_probability(logits[q, position])),
                    )
                )
            results.append(matches)
        return results

    # ---------------------------------------------------------------- fill-mask

    def fill_mask(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        *,
        top_k: int = 5,
    ) -> list[list[list[MaskPrediction]]]:
        """Predict the tokens at each mask token of texts[i], given images[i].

        Write the mask as `predictor.processor.mask_token` ("<mask>" for RoBERTa).
        A single image or text is paired with every item of the other.

        Returns:
          for each pair, for each mask in order, the `top_k` predictions, most
          probable first.
        """
        self._require("mlm", "fill_mask")
        _check_counts(top_k=top_k)
        images, texts = _pairs(as_image_list(images), self._texts(texts))
        tokenizer = self.processor.tokenizer
        mask_id = tokenizer.mask_token_id
        results = []
        for part in self._batches(len(texts), "Filling masks"):
            ids, mask = self._tokens(texts[part])
            for offset, (row, text) in enumerate(zip(ids, texts[part], strict=True)):
                if mask_id in row:
                    continue
                where = (
                    f"past the {self.max_text_length}-token limit, where it was cut off"
                    if tokenizer.mask_token in text
                    else f"anywhere; write {tokenizer.mask_token} where the model "
                    "should predict a word"
                )
                raise ValueError(
                    f"text {part.start + offset} ({preview_text(text)!r}) has no "
                    f"{tokenizer.mask_token} token {where}."
                )
            pixels = self._pixels(images[part], part.start)
            top_k = min(top_k, len(tokenizer))
            probabilities, token_ids = self._run(
                "mlm", len(ids), ids, mask, pixels, top_k=top_k
            )
            for row in range(len(ids)):
                results.append(
                    self._mask_predictions(
                        ids[row][mask[row] == 1],
                        probabilities[row],
                        token_ids[row],
                        mask_id,
                    )
                )
        return results

    def _mask_predictions(self, ids, probabilities, token_ids, mask_id):
        """Build the predictions of each mask in `ids` (the unpadded tokens)."""
        tokenizer = self.processor.tokenizer
        # Decoding drops <s> and </s> but keeps the other masks and any <pad> text.
        bounds = {tokenizer.cls_token_id, tokenizer.sep_token_id}
        predictions = []
        for position in np.flatnonzero(ids == mask_id):
            options = []
            for probability, token_id in zip(
                probabilities[position], token_ids[position], strict=True
            ):
                filled = ids.copy()
                filled[position] = token_id
                kept = [int(t) for t in filled if t not in bounds]
                options.append(
                    MaskPrediction(
                        token_id=int(token_id),
                        token=tokenizer.decode([int(token_id)]),
                        probability=float(probability),
                        sequence=tokenizer.decode(kept),
                    )
                )
            predictions.append(options)
        return predictions


def as_image_list(images) -> list:
    """Turn one image, a list, a generator or a 4-D batch into a list of images."""
    if isinstance(images, (str, os.PathLike, bytes)):
        return [images]
    if hasattr(images, "ndim") and hasattr(images, "__array__"):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Iterable) and not hasattr(images, "getexif"):
        images = list(images)
        if not images:
            raise ValueError("no images given; pass at least one image.")
        return images
    return [images]


def _gallery_items(items, kind: str) -> list:
    items = [items] if isinstance(items, str) else list(items)
    if not items:
        raise ValueError(f"the gallery is empty; pass at least one of the {kind}.")
    return items


def _check_counts(**values) -> None:
    for name, value in values.items():
        _check_count(name, value)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_image_size(image_processor, image_size: int, user: str = "Predictor") -> None:
    """Reject preprocessing whose output the model cannot take."""
    if not image_processor.do_center_crop:
        raise ValueError(
            f"the {user} needs do_center_crop=True: the model takes images of "
            f"exactly {image_size}x{image_size} pixels."
        )
    if image_processor.crop_shape != (image_size, image_size):
        height, width = image_processor.crop_shape
        raise ValueError(
            f"the image processor crops to {height}x{width} but the model takes "
            f"{image_size}x{image_size} images; set crop_size to {image_size} in "
            "preprocessor_config.json, or pass crop_size="
            f"{image_size} to {user}.from_pretrained."
        )


def _fingerprint(items: list) -> str | None:
    """Hash the content of images or texts, to recognise a gallery seen before.

    Returns None when an item's content cannot be read, and the gallery is then
    not cached.
    """
    digest = hashlib.sha1()
    for item in items:
        if isinstance(item, str | os.PathLike):
            # The size and modification time catch a file replaced at the same path.
            try:
                stat = os.stat(item)
                version = f":{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                version = ""
            digest.update(b"path:" + os.fsencode(item) + version.encode())
        elif isinstance(item, bytes):
            digest.update(b"bytes:" + item)
        elif hasattr(item, "getexif"):  # a PIL image
            digest.update(f"pil:{item.size}:{item.mode}:".encode())
            digest.update(item.tobytes())
        elif hasattr(item, "__array__"):  # NumPy, JAX and PyTorch arrays
            array = np.asarray(item)
            digest.update(f"array:{array.shape}:{array.dtype}:".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        else:
            return None
        digest.update(b"\0")
    return digest.hexdigest()


def _pairs(images: list, texts: str | Sequence[str]) -> tuple[list, list[str]]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(images) == 1 and len(texts) > 1:
        images = images * len(texts)
    elif len(texts) == 1 and len(images) > 1:
        texts = texts * len(images)
    if len(images) != len(texts):
        raise ValueError(
            f"got {len(images)} image(s) and {len(texts)} text(s); pass one image "
            "per text, or a single image or text to pair with all of the other."
        )
    if not texts:
        raise ValueError("no image-text pairs given.")
    return images, texts


def _gallery_ids(items: list, ids: Sequence[str] | None) -> list[str]:
    if ids is None:
        return [str(i) for i in range(len(items))]
    ids = [str(i) for i in ids]
    if len(ids) != len(items):
        raise ValueError(f"got {len(ids)} ids for {len(items)} items; pass one each.")
    return ids


def _check_kind(gallery: Gallery, kind: str, task: str) -> None:
    if gallery.kind != kind:
        raise ValueError(
            f"{task} expects a gallery of {kind}s, but this one contains {gallery.kind}s."
        )


def _match_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax probability of class 1 ("match") of ITM logits `(..., 2)`."""
    logits = np.asarray(logits, np.float64)
    return (1 / (1 + np.exp(logits[..., 0] - logits[..., 1]))).astype(np.float32)


__all__ = [
    "Gallery",
    "MaskPrediction",
    "Match",
    "Predictor",
    "bucket_size",
]
