"""Deterministic, checkpointable grain pipelines from built datasets to batches.

One epoch visits every (image, text) pair once, as the reference pretraining
does for COCO's five captions per image. With `texts="one"` it visits each
image once instead, with one of its texts drawn at random. The order of work is

    pairs -> shuffle(seed, per epoch) -> repeat -> trim to whole global batches
          -> load, decode, preprocess, tokenise, mask (seeded by position)
          -> this host's slice -> (worker processes) -> skip invalid -> batch

so an element's content depends only on its position in the global stream,
and host `i` of `n` reads block `i` of each global batch (rows `i * b` to
`(i + 1) * b - 1` for a host batch of `b`): the hosts' blocks are disjoint and,
in process order, form the global batch in a single host's row order. Examples whose image cannot be
decoded or whose text is empty are skipped, logged with their id, and counted
by the iterator (`iterator.skipped`). The iterator's state (`get_state`,
`set_state`, or Orbax through `grain.checkpoint.CheckpointSave`) resumes
exactly at the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from bt_jax.data.reading import SECOND_IMAGE_FIELD, Records
from bt_jax.data.vqa import dense_targets
from bt_jax.losses import IGNORE_INDEX
from bt_jax.processing import (
    BridgeTowerProcessor,
    ImageFileError,
    load_image,
    pad_batch,
)

logger = logging.getLogger(__name__)

# Beyond this many log lines per reason the iterator only counts skips.
MAX_LOGGED_SKIPS = 20


def mask_tokens(
    input_ids: np.ndarray,
    special_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply BERT-style masking for masked language modelling.

    Each position that is not special (special tokens and padding) is selected
    with `probability`. A selected token becomes `mask_token_id` 80% of the
    time, a token drawn uniformly from the vocabulary 10% of the time, and
    stays unchanged otherwise.

    Returns:
      `(masked_ids, labels)`: labels hold the original id at selected positions
      and -100 elsewhere.
    """
    input_ids = np.asarray(input_ids)
    selected = (rng.random(input_ids.shape) < probability) & ~special_mask.astype(bool)
    labels = np.where(selected, input_ids, IGNORE_INDEX).astype(input_ids.dtype)
    choice = rng.random(input_ids.shape)
    random_ids = rng.integers(0, vocab_size, input_ids.shape, dtype=input_ids.dtype)
    masked = np.where(selected & (choice < 0.8), mask_token_id, input_ids)
    masked = np.where(selected & (choice >= 0.8) & (choice < 0.9), random_ids, masked)
    return masked.astype(input_ids.dtype), labels


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Settings that turn a dataset into batches.

    Attributes:
      global_batch_size: examples per step over all hosts; each host gets
        global_batch_size / shard_count of them.
      max_text_length: texts are truncated and padded to this many tokens.
      seed: fixes the shuffle, the text drawn in `texts="one"` mode and the
        MLM masks.
      num_epochs: passes over the data; None repeats forever.
      shuffle: shuffle the pairs, differently in each epoch.
      texts: "all" visits every (image, text) pair per epoch; "one" visits
        every image once with a random one of its texts.
      mlm_probability: share of text tokens selected for MLM; 0 turns the MLM
        inputs off.
      drop_remainder: drop a final partial batch so every batch has the same
        shape (a global batch is never split between epochs' ends and hosts).
      worker_count: grain worker processes (0 works in the calling process).
      worker_buffer_size: examples each worker prepares ahead.
      read_threads: threads that prepare examples in each process (the calling
        one, or each worker). Decoding and resizing release the GIL, so threads
        use several cores. Default: the CPU count without workers, 1 with them.
    """

    global_batch_size: int
    max_text_length: int = 50
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    texts: Literal["all", "one"] = "all"
    mlm_probability: float = 0.15
    drop_remainder: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 16
    read_threads: int | None = None

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError(
                f"global_batch_size must be positive, got {self.global_batch_size}."
            )
        if self.max_text_length < 3:
            raise ValueError(
                f"max_text_length must leave room for text between <s> and </s>, "
                f"got {self.max_text_length}."
            )
        if self.texts not in ("all", "one"):
            raise ValueError(f'texts must be "all" or "one", got {self.texts!r}.')
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(
                f"mlm_probability must be in [0, 1), got {self.mlm_probability}."
            )
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(
                f"num_epochs must be positive or None, got {self.num_epochs}."
            )
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}.")
        if self.read_threads is not None and self.read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {self.read_threads}.")


@dataclasses.dataclass(frozen=True)
class Invalid:
    """An element that was skipped, with the id it is reported under."""

    id: str
    reason: str


class _PairIndex(Sequence):
    """Pair position -> (record index, text index); text index -1 means "draw one"."""

    def __init__(self, texts_per_record: Sequence[int], mode: str):
        counts = np.asarray(texts_per_record, np.int64)
        if mode == "all":
            self.records = np.repeat(np.arange(len(counts)), counts)
            starts = np.cumsum(counts) - counts
            self.texts = np.arange(counts.sum()) - np.repeat(starts, counts)
        else:
            self.records = np.flatnonzero(counts > 0)
            self.texts = np.full(len(self.records), -1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return int(self.records[index]), int(self.texts[index])


class _ExampleTransform:
    """(record, text) -> model inputs, or `Invalid`; picklable for worker processes."""

    def __init__(
        self, records: Records, processor: BridgeTowerProcessor, config: PipelineConfig
    ):
        self.records = records
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.special_ids = np.asarray(sorted(set(self.tokenizer.all_special_ids)))
        self.mask_token_id = processor.mask_token_id if config.mlm_probability else 0
        self.vocab_size = len(self.tokenizer)
        self.answer_vocab = records.answer_vocab
        self.task = records.task

    def __call__(self, pair: tuple[int, int], rng: np.random.Generator):
        record_index, text_index = pair
        try:
            record = self.records[record_index]
        except Exception as err:  # a damaged record must not stop training
            return Invalid(f"record {record_index}", f"invalid record: {err}")
        texts = record["texts"]
        if not texts:
            return Invalid(record["id"], "no texts")
        if text_index < 0:
            text_index = int(rng.integers(len(texts)))
        text_id = record["text_ids"][text_index]
        text = texts[text_index].strip() if isinstance(texts[text_index], str) else ""
        if not text:
            return Invalid(text_id, "empty text")
        try:
            pixels = self.image_processor.process_one(load_image(record["image"]))
        except (ImageFileError, ValueError, OSError) as err:
            return Invalid(record["id"], f"corrupt image: {err}")
        example = {"pixel_values": pixels}
        if self.task == "nlvr2":
            second = record.get(SECOND_IMAGE_FIELD)
            if second is None or not len(second):
                return Invalid(
                    record["id"], "missing image: the record has no second image"
                )
            try:
                example["pixel_values_2"] = self.image_processor.process_one(
                    load_image(second)
                )
            except (ImageFileError, ValueError, OSError) as err:
                return Invalid(record["id"], f"corrupt image: second image: {err}")
        if self.task in ("nlvr2", "snli-ve"):
            labels = record.get("labels")
            if labels is None or len(labels) != len(texts):
                count = "no" if labels is None else len(labels)
                return Invalid(
                    record["id"],
                    f"invalid record: {count} labels for {len(texts)} texts",
                )
            example["labels"] = np.int32(labels[text_index])
        example.update(
            record_index=np.int64(record_index),
            text_index=np.int32(text_index),
            **self._tokenize(text, rng),
        )
        if self.answer_vocab is not None and "answer_counts" in record:
            example.update(self._vqa_targets(record, text_index))
        return example

    def _tokenize(self, text: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.config.max_text_length,
            return_attention_mask=True,
        )
        input_ids = np.asarray(encoded["input_ids"], np.int32)
        attention_mask = np.asarray(encoded["attention_mask"], np.int32)
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.config.mlm_probability:
            special = np.isin(input_ids, self.special_ids) | (attention_mask == 0)
            tokens["mlm_input_ids"], tokens["mlm_labels"] = mask_tokens(
                input_ids,
                special,
                rng,
                mask_token_id=self.mask_token_id,
                vocab_size=self.vocab_size,
                probability=self.config.mlm_probability,
            )
        return tokens

    def _vqa_targets(self, record: dict, question: int) -> dict[str, np.ndarray]:
        counts = record["answer_counts"]
        start = int(sum(counts[:question]))
        stop = start + int(counts[question])
        return {
            "question_id": np.int64(record["question_ids"][question]),
            "vqa_targets": dense_targets(
                record["answer_labels"][start:stop],
                record["answer_scores"][start:stop],
                len(self.answer_vocab),
            ),
        }


def _stack(
    examples: Sequence[dict[str, Any]], pad_images: bool
) -> dict[str, np.ndarray]:
    image_keys = [
        key for key in ("pixel_values", "pixel_values_2") if key in examples[0]
    ]
    batch = {
        key: np.stack([example[key] for example in examples])
        for key in examples[0]
        if key not in image_keys or not pad_images
    }
    if pad_images:
        # Without a center crop, images differ in size: pad like the processor,
        # which adds pixel_mask. An NLVR2 pair's two images are padded to one
        # size, so pixel_values and pixel_values_2 have the same shape.
        padded = pad_batch([example[key] for key in image_keys for example in examples])
        for number, key in enumerate(image_keys):
            rows = slice(number * len(examples), (number + 1) * len(examples))
            suffix = key.removeprefix("pixel_values")
            batch[key] = padded["pixel_values"][rows]
            batch[f"pixel_mask{suffix}"] = padded["pixel_mask"][rows]
    return batch


class SkipCountingIterator(grain.DatasetIterator):
    """The pipeline's iterator: batches valid examples and counts skipped ones.

    It runs in the calling process, after any worker processes, so batches are
    the same whatever the worker count. Its state is the position in this
    host's stream and the skip count, so a state restores into a pipeline with
    another `worker_count` or `read_threads` too. Call `close()` when done, to
    stop worker processes.

    Attributes:
      skipped: `(id, reason)` of every example skipped since this iterator was
        created or restored, in stream order.
      skipped_total: skips since the start of the stream, including those in a
        dropped final partial batch; restored with the state.
    """

    def __init__(self, batches: _Batches):
        super().__init__()
        self._batches = batches
        self._position = 0
        self._stream: grain.DatasetIterator | None = None
        self.skipped: list[tuple[str, str]] = []
        self.skipped_total = 0
        self._logged = collections.Counter()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stream is None:
            self._stream = self._batches.stream(self._position)
            # Stops worker processes even if close() is never called, before
            # interpreter shutdown tears down the modules grain's cleanup needs.
            self._finalizer = weakref.finalize(self, _close_stream, self._stream)
        examples = []
        while len(examples) < self._batches.batch_size:
            try:
                element = next(self._stream)
            except StopIteration:
                if examples and not self._batches.drop_remainder:
                    return _stack(examples, self._batches.pad_images)
                raise
            self._position += 1
            if isinstance(element, Invalid):
                self._skip(element)
            else:
                examples.append(element)
        return _stack(examples, self._batches.pad_images)

    def _skip(self, element: Invalid) -> None:
        kind = element.reason.split(":")[0]
        self._logged[kind] += 1
        if self._logged[kind] <= MAX_LOGGED_SKIPS:
            logger.warning("skipped %s: %s", element.id, element.reason)
        elif self._logged[kind] == MAX_LOGGED_SKIPS + 1:
            logger.warning(
                "more examples skipped for %r; counting without logging", kind
            )
        self.skipped.append((element.id, element.reason))
        self.skipped_total += 1

    def get_state(self) -> dict[str, int]:
        return {"position": self._position, "skipped": self.skipped_total}

    def set_state(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or not {"position", "skipped"} <= set(state):
            raise ValueError(
                f"invalid pipeline state {state!r}: expected the dict that "
                "get_state() returns, with 'position' and 'skipped'."
            )
        self.close()
        self._position = int(state["position"])
        self.skipped_total = int(state["skipped"])
        self.skipped = []

    def close(self) -> None:
        """Stop the worker processes, if any; the iterator restarts on next()."""
        if self._stream is not None:
            self._finalizer()
            self._stream = None


def _close_stream(stream: grain.DatasetIterator) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


class _HostBlocks(grain.MapDataset):
    """This host's block of every global batch: rows [i * b, (i + 1) * b).

    `jax.make_array_from_process_local_data` places process i's rows after
    those of processes 0 to i - 1, so contiguous blocks give the global array
    the same row order as a single process reading the whole batch.
    """

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
        super().__init__(parent)
        self._index, self._count, self._block = index, count, block

    def __len__(self) -> int:
        stride = self._count * self._block
        whole, rest = divmod(len(self._parent), stride)
        return whole * self._block + min(
            max(rest - self._index * self._block, 0), self._block
        )

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        batch, row = divmod(position, self._block)
        stride = self._count * self._block
        return self._parent[batch * stride + self._index * self._block + row]

    def __str__(self) -> str:
        return f"_HostBlocks(index={self._index}, count={self._count}, block={self._block})"


class _Batches(grain.IterDataset):
    """Batches of one host's examples, resumable from any stream position."""

    def __init__(
        self,
        examples: grain.MapDataset,
        *,
        batch_size: int,
        drop_remainder: bool,
        pad_images: bool,
        read_threads: int,
        worker_count: int,
        worker_buffer_size: int,
    ):
        super().__init__(examples)
        self.examples = examples
        self.batch_size = batch_size
        self.drop_remainder = drop_remainder
        self.pad_images = pad_images
        self.read_threads = read_threads
        self.worker_count = worker_count
        self.worker_buffer_size = worker_buffer_size

    def stream(self, position: int) -> grain.DatasetIterator:
        """Return an iterator over the examples from `position` on."""
        examples = self.examples[position:] if position else self.examples
        stream = examples.to_iter_dataset(
            grain.ReadOptions(
                num_threads=self.read_threads, prefetch_buffer_size=2 * self.batch_size
            )
        )
        if self.worker_count:
            _mark_absl_flags_parsed()
            # Workers prepare single examples. Grain hands worker w the positions
            # w, w + W, ... and interleaves their outputs in turn, so the stream
            # keeps its order and batches match a run without workers.
            stream = stream.mp_prefetch(
                grain.multiprocessing.MultiprocessingOptions(
                    num_workers=self.worker_count,
                    per_worker_buffer_size=self.worker_buffer_size,
                )
            )
        return iter(stream)

    def __iter__(self) -> SkipCountingIterator:
        return SkipCountingIterator(self)


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag; programs that never parse absl
    # flags (every bt-jax entry point) would otherwise fail when workers start.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _default_shard() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def make_pipeline(
    records: Records,
    processor: BridgeTowerProcessor,
    config: PipelineConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Build the batch pipeline for one host.

    Args:
      records: the split to read (`bt_jax.data.open_records`).
      processor: image preprocessing and tokenizer, as for inference.
      config: batching, shuffling and masking.
      shard_index, shard_count: this host's place among the hosts that share
        each global batch; default `jax.process_index()` and
        `jax.process_count()`.

    Returns:
      An iterable whose iterator (`SkipCountingIterator`) yields dicts of numpy
      arrays: `pixel_values` (B, H, W, 3) float32 (and `pixel_mask` (B, H, W)
      when images are not center-cropped and get padded), `input_ids` and `attention_mask` (B, T) int32, `mlm_input_ids` and
      `mlm_labels` (B, T) when MLM is on, `record_index` and `text_index` (B,),
      for VQA `question_id` (B,) and `vqa_targets` (B, answers) float32, for
      NLVR2 and SNLI-VE `labels` (B,) int32, the class of each text, and for
      NLVR2 `pixel_values_2`, the pair's second image processed like the first
      (and `pixel_mask_2` when padded). `records.task` names the task, and so
      which of these a split gives.
    """
    if shard_index is None or shard_count is None:
        shard_index, shard_count = _default_shard()
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index must be in [0, {shard_count}), got {shard_index}."
        )
    if config.global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by "
            f"{shard_count} data shards; use a multiple of {shard_count}."
        )
    if config.mlm_probability and processor.tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; set mlm_probability=0.")
    host_batch = config.global_batch_size // shard_count

    limit = processor.max_text_length
    if limit is not None and config.max_text_length > limit:
        raise ValueError(
            f"max_text_length {config.max_text_length} is longer than the model's "
            f"limit of {limit} tokens; use at most {limit}."
        )
    pairs = _PairIndex(records.texts_per_record(), config.texts)
    epochs = config.num_epochs
    total = len(pairs) if epochs is None else len(pairs) * epochs
    if not len(pairs) or (config.drop_remainder and total < config.global_batch_size):
        raise ValueError(
            f"{records.split} has {len(pairs)} examples, fewer than one global "
            f"batch of {config.global_batch_size} over {epochs or 'unlimited'} "
            "epochs; lower global_batch_size or raise num_epochs."
        )
    logger.info(
        "pipeline over %d examples of %s: %d per host batch, shard %d of %d",
        len(pairs),
        records.split,
        host_batch,
        shard_index,
        shard_count,
    )
    dataset = grain.MapDataset.source(pairs)
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    dataset = dataset.repeat(config.num_epochs)
    if config.num_epochs is not None and config.drop_remainder:
        whole = len(dataset) // config.global_batch_size * config.global_batch_size
        dataset = dataset[:whole]
    # Seeding by the global position keeps masks and draws independent of how
    # many hosts read the stream.
    dataset = dataset.random_map(
        _ExampleTransform(records, processor, config), seed=config.seed
    )
    if shard_count > 1:
        dataset = _HostBlocks(dataset, shard_index, shard_count, host_batch)
    # NOTE: skipped examples are not replaced, so with num_epochs set and broken
    # records, hosts can reach the end of the data one batch apart. Multi-host
    # training should use num_epochs=None and stop after a number of steps.
    return _Batches(
        dataset,
        batch_size=host_batch,
        drop_remainder=config.drop_remainder,
        pad_images=not processor.image_processor.do_center_crop,
        read_threads=config.read_threads
        or (1 if config.worker_count else os.cpu_count() or 1),
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
    )
