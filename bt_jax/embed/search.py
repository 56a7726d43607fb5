"""Exact cosine search over the files an embedding job wrote.

`EmbeddingStore(out)` opens a finished job's folder. Its matrices are memory
mapped and scanned in blocks, so searching needs memory for one block, not the
whole matrix. Rows are L2-normalised, so the cosine similarity is a dot
product and the search is exact: it returns the true top k.

NOTE: exact search reads every row for every batch of queries: N x dim x 4
bytes in float32, half that in float16. On 2 CPU cores, one query against an
in-memory 1M x 512 float32 matrix (2 GB) took about 0.1 s, and 16 queries
0.5 s. A matrix read from disk adds the disk's read time. Beyond a few million
rows, or for many queries per second, load the `.npy` files into an
approximate nearest-neighbour index (FAISS, ScaNN, or a vector database such
as Qdrant or Milvus) and keep `ids.jsonl` as the row-to-record table.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bt_jax.embed.job import IDS, MANIFEST

# Rows scanned at a time: 65,536 x 512 float32 is 128 MiB.
BLOCK_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: the row, its cosine similarity and its ids.jsonl record."""

    index: int
    score: float
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return self.record.get("id", str(self.index))


class EmbeddingStore:
    """A finished embedding job's folder: matrices, ids and settings."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"{manifest_file} not found; pass the output folder of "
                "`python -m bt_jax.embed run`."
            )
        self.manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if not self.manifest.get("complete"):
            raise ValueError(
                f"the embedding job in {self.path} has not finished; rerun its command "
                "to resume it, then open the folder again."
            )
        self.kinds = tuple(self.manifest["settings"]["kinds"])
        self.model = self.manifest["settings"].get("model") or None

    def __len__(self) -> int:
        return int(self.manifest["embedded"])

    def vectors(self, kind: str | None = None) -> np.ndarray:
        """Return the `(rows, dim)` matrix of `kind`, memory mapped (read-only)."""
        kind = self._kind(kind)
        return np.load(self.path / f"{kind}.npy", mmap_mode="r")

    def _kind(self, kind: str | None) -> str:
        if kind is None:
            return self.kinds[0]
        if kind not in self.kinds:
            raise ValueError(
                f"{self.path} contains {', '.join(self.kinds)} embeddings, not {kind!r}; "
                f"pass one of those, or embed again with --kinds {kind}."
            )
        return kind

    def records(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Return the ids.jsonl records of rows `indices`, reading the file once."""
        requested = {int(i) for i in indices}
        found: dict[int, dict[str, Any]] = {}
        with (self.path / IDS).open(encoding="utf-8") as file:
            for row, line in enumerate(file):
                if row in requested:
                    found[row] = json.loads(line)
                    if len(found) == len(requested):
                        break
        missing = requested - set(found)
        if missing:
            raise IndexError(f"rows {sorted(missing)[:5]} are not in {self.path / IDS}")
        return [found[int(i)] for i in indices]

    def search(
        self, queries: np.ndarray, *, k: int = 10, kind: str | None = None
    ) -> list[list[Hit]]:
        """Return the `k` rows most similar to each query, best first.

        Args:
          queries: `(dim,)` or `(queries, dim)` embeddings, such as
            `Embedder.embed_texts(["a red car"])`; normalised here.
          k: results per query.
          kind: which matrix to search; by default the first the job wrote.
        """
        indices, scores = top_k(self.vectors(kind), queries, k)
        records = self.records(sorted({int(i) for i in indices.ravel()}))
        by_row = dict(
            zip(sorted({int(i) for i in indices.ravel()}), records, strict=True)
        )
        return [
            [
                Hit(int(i), float(s), by_row[int(i)])
                for i, s in zip(row_indices, row_scores, strict=True)
            ]
            for row_indices, row_scores in zip(indices, scores, strict=True)
        ]


def top_k(
    matrix: np.ndarray, queries: np.ndarray, k: int, *, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine similarity of `queries` against the rows of `matrix`.

    `matrix` rows must be L2-normalised (an embedding job's are); queries are
    normalised here. Blocks of `block_rows` rows are scanned in order and ties
    keep the lower row first, so the result does not depend on the block size.

    Returns:
      `(indices, scores)`, each `(queries, min(k, rows))`, best first.
    """
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[-1] != matrix.shape[-1]:
        raise ValueError(
            f"queries have {queries.shape[-1]} dimensions and the embeddings "
            f"{matrix.shape[-1]}; embed the queries with the same model."
        )
    if not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not np.isfinite(queries).all():
        raise ValueError(
            "a query embedding contains NaN or infinity; embed the queries again."
        )
    k = int(k)
    norms = np.linalg.norm(queries, axis=-1, keepdims=True)
    queries = queries / np.maximum(norms, np.finfo(np.float32).tiny)
    k = min(k, matrix.shape[0])
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_indices = np.full((len(queries), k), np.iinfo(np.int64).max, np.int64)
    for start in range(0, matrix.shape[0], block_rows):
        block = np.asarray(matrix[start : start + block_rows], np.float32)
        scores = queries @ block.T
        if scores.shape[1] > k:
            # Only rows at or above each query's k-th best score can enter the top k.
            # Rows tied with it are all kept, so ties still resolve by row.
            kth = np.partition(scores, -k, axis=1)[:, -k]
        else:
            kth = np.full(len(queries), -np.inf, np.float32)
        for q, threshold in enumerate(kth):
            candidates = np.flatnonzero(scores[q] >= threshold)
            merged_scores = np.concatenate([best_scores[q], scores[q, candidates]])
            merged_indices = np.concatenate([best_indices[q], candidates + start])
            # Sort by score, best first, then by row.
            order = np.lexsort((merged_indices, -merged_scores))[:k]
            best_scores[q] = merged_scores[order]
            best_indices[q] = merged_indices[order]
    return best_indices, best_scores
