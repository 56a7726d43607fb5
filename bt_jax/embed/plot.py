"""A 2-D map of stored embeddings, coloured by a record field, as a PNG.

The projection is UMAP when `umap-learn` is installed and PCA otherwise (or on
request). UMAP keeps neighbourhoods and shows clusters better; PCA is linear,
deterministic and needs nothing beyond NumPy. Large stores are subsampled to
`max_points` evenly spaced rows, read one at a time from the memory-mapped
matrix, so the plot's memory does not grow with the store.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from bt_jax.embed.search import EmbeddingStore

logger = logging.getLogger(__name__)

METHODS = ("auto", "umap", "pca")
# Labels drawn in their own colour; the rest are grouped as "other", in grey.
MAX_LABELS = 18
# tab20 without its two greys (14 and 15), which would look like "other".
_COLOURS = [i for i in range(20) if i not in (14, 15)]


def project(
    points: np.ndarray, method: str = "auto", *, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Project `(n, dim)` points to `(n, 2)`; return them and the method used."""
    if method not in METHODS:
        raise ValueError(f"unknown projection {method!r}; choose among {METHODS}.")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        raise ModuleNotFoundError(
            "UMAP needs the umap-learn package: `pip install umap-learn`, or use "
            "PCA (method='pca', or --method pca on the command line)."
        )
    points = np.asarray(points, np.float32)
    if (method == "umap" or (method == "auto" and has_umap)) and len(points) > 3:
        import umap

        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=min(15, len(points) - 1),
            metric="cosine",
            random_state=seed,
        )
        return reducer.fit_transform(points), "UMAP"
    return pca(points), "PCA"


def pca(points: np.ndarray, components: int = 2) -> np.ndarray:
    """Project onto the top principal components; signs fixed for reproducibility.

    Each component's sign makes its largest-magnitude loading positive, so the
    same data always gives the same picture.
    """
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:components]
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    vt = vt * signs[:, None]
    projected = centred @ vt.T
    if projected.shape[1] < components:  # fewer points than components
        projected = np.pad(projected, ((0, 0), (0, components - projected.shape[1])))
    return projected


def plot_store(
    store: EmbeddingStore | str | os.PathLike,
    output: str | os.PathLike,
    *,
    kind: str | None = None,
    label: str | None = None,
    method: str = "auto",
    max_points: int = 20_000,
    title: str | None = None,
) -> Path:
    """Write a scatter plot of a store's embeddings to `output` (PNG by default).

    Args:
      store: an `EmbeddingStore` or the job's output folder.
      output: the image file; its extension picks the format (PNG if it has
        none). The path written is returned.
      kind: which embeddings; by default the first the job wrote.
      label: the ids.jsonl field that colours the points, such as "label". None
        uses "label" when the records have it, else one colour.
      method: "auto" (UMAP if installed, else PCA), "umap" or "pca".
      max_points: most points drawn; larger stores are subsampled evenly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive integer, got {max_points!r}.")
    output = Path(output)
    if not output.suffix:
        output = output.with_suffix(".png")
    if not isinstance(store, EmbeddingStore):
        store = EmbeddingStore(store)
    vectors = store.vectors(kind)
    rows = len(vectors)
    if rows == 0:
        raise ValueError(
            f"{store.path} contains no embeddings to plot; every record was skipped "
            "(see skipped.jsonl)."
        )
    chosen = np.unique(np.linspace(0, rows - 1, min(rows, max_points)).astype(np.int64))
    points = np.stack([np.asarray(vectors[i], np.float32) for i in chosen])
    records = store.records(chosen.tolist())
    if label is None and any("label" in record for record in records):
        label = "label"
    if label is not None and not any(label in record for record in records):
        fields = sorted({key for record in records[:100] for key in record})
        raise ValueError(
            f"no record has the field {label!r}; fields are {fields}. Pass one of "
            "them, or no label."
        )
    labels = [str(record.get(label, "none")) if label else "" for record in records]
    xy, used = project(points, method)

    counts = collections.Counter(labels)
    legend_labels = [name for name, _ in counts.most_common(MAX_LABELS)]
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(legend_labels):
        mask = np.array([value == name for value in labels])
        ax.scatter(
            xy[mask, 0],
            xy[mask, 1],
            s=18,
            alpha=0.8,
            color=colours(_COLOURS[i]),
            label=f"{name} ({counts[name]})" if label else None,
        )
    other = np.array([value not in legend_labels for value in labels])
    if other.any():
        ax.scatter(
            xy[other, 0], xy[other, 1], s=10, alpha=0.4, color="0.6", label="other"
        )
    if label:
        ax.legend(title=label, fontsize=8, loc="best", markerscale=1.5)
    kind_name = kind or store.kinds[0]
    sampled = f", {len(chosen)} of {rows} shown" if len(chosen) < rows else ""
    ax.set_title(title or f"{kind_name} embeddings, {used} ({rows} rows{sampled})")
    ax.set_xlabel(f"{used} 1")
    ax.set_ylabel(f"{used} 2")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    logger.info("Wrote %s (%s of %d points)", output, used, len(chosen))
    return output
