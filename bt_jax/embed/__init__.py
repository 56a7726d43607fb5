"""Image-text embeddings for retrieval pipelines: embed, store, search, plot.

- `Embedder`: joint (cross-modal), text and image ITC embeddings, L2-normalised,
  in float32 or float16, from raw inputs or preprocessed batches.
- `run`: the resumable, streaming job behind `python -m bt_jax.embed run`,
  which embeds a folder or a JSON Lines file into `.npy` matrices and an
  `ids.jsonl` file.
- `EmbeddingStore` and `top_k`: exact cosine search over a job's output.
- `plot_store`: a 2-D projection of the embeddings, coloured by a field.
"""

from bt_jax.embed.embedder import KINDS, Embedder, PairEmbeddings, parse_kinds
from bt_jax.embed.job import JobResult, SettingsMismatchError, run
from bt_jax.embed.plot import plot_store, project
from bt_jax.embed.records import FolderSource, JsonlSource, open_source
from bt_jax.embed.search import EmbeddingStore, Hit, top_k

__all__ = [
    "KINDS",
    "Embedder",
    "EmbeddingStore",
    "FolderSource",
    "Hit",
    "JobResult",
    "JsonlSource",
    "PairEmbeddings",
    "SettingsMismatchError",
    "open_source",
    "parse_kinds",
    "plot_store",
    "project",
    "run",
    "top_k",
]
