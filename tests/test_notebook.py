"""Run notebooks/quickstart.ipynb end to end on a tiny random checkpoint.

The checkpoint comes from `python -m convert init-random --config configs/sample.py`
(PyTorch) followed by `python -m convert to-jax`, so the test needs PyTorch. The
notebook runs in a Jupyter kernel started by nbclient, in `tmp_path`, and reads
the checkpoint and figure paths from the environment variables BT_JAX_CHECKPOINT
and BT_JAX_FIGURE.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip(
    "torch", reason="convert init-random builds the tiny checkpoint with PyTorch"
)

from PIL import Image  # noqa: E402

from bt_jax.samples import load_samples  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "python3"
# Seconds one cell may run before nbclient stops the notebook.
CELL_TIMEOUT = 600
MIN_FIGURE_SIDE = 200


def _stream_text(notebook) -> str:
    """Join the stdout and stderr text of every code cell."""
    parts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
    return "".join(parts)


def _has_png_display(notebook) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


def _build_tiny_checkpoint(directory: Path) -> Path:
    """Write the tiny random checkpoint with all three heads and convert it to bt-jax."""
    torch_dir = directory / "tiny-torch"
    jax_dir = directory / "tiny-jax"
    commands = [
        [
            "init-random",
            str(torch_dir),
            "--config",
            "configs/sample.py",
            "--head",
            "mlm+itm+itc",
            "--processor",
        ],
        ["to-jax", str(torch_dir), str(jax_dir)],
    ]
    for arguments in commands:
        subprocess.run(
            [sys.executable, "-m", "convert", *arguments], check=True, cwd=REPO
        )
    return jax_dir


def test_notebook_saved_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    with_outputs = [i for i, cell in enumerate(code_cells) if cell.outputs]
    with_counts = [
        i for i, cell in enumerate(code_cells) if cell.execution_count is not None
    ]

    assert code_cells, f"{NOTEBOOK} has no code cells"
    assert not with_outputs, (
        f"code cells {with_outputs} of {NOTEBOOK} store outputs; clear them before committing"
    )
    assert not with_counts, (
        f"code cells {with_counts} of {NOTEBOOK} store execution counts; clear them "
        "before committing"
    )


def test_notebook_has_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [
        cell
        for cell in notebook.cells
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]

    assert len(tagged) == 1, (
        f"expected one cell tagged 'parameters', found {len(tagged)}"
    )
    assert "BT_JAX_CHECKPOINT" in tagged[0].source
    assert "BT_JAX_FIGURE" in tagged[0].source


def test_quickstart_runs_on_tiny_checkpoint(tmp_path, monkeypatch):
    checkpoint = _build_tiny_checkpoint(tmp_path)
    figure = tmp_path / "figures" / "quickstart.png"
    figure.parent.mkdir()
    monkeypatch.setenv("BT_JAX_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("BT_JAX_FIGURE", str(figure))
    # The kernel then imports bt_jax from this checkout, even if another copy is
    # installed.
    monkeypatch.setenv("PYTHONPATH", str(REPO), prepend=os.pathsep)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # jupyter_client 8 replaces the kernelspec command "python" with sys.executable.
    # This extra first cell checks that the kernel runs this interpreter.
    notebook.cells.insert(
        0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")
    )
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    # Raises nbclient.exceptions.CellExecutionError, with the cell's traceback,
    # if any cell fails.
    client.execute()

    kernel_executable = notebook.cells[0].outputs[0]["text"].strip()
    assert kernel_executable == sys.executable

    assert figure.is_file(), f"the notebook did not save the figure to {figure}"
    with Image.open(figure) as image:
        assert image.format == "PNG"
        assert image.width > MIN_FIGURE_SIDE
        assert image.height > MIN_FIGURE_SIDE
    assert _has_png_display(notebook), "the notebook displayed no PNG figure"
    embeddings_figure = figure.with_name("quickstart-embeddings.png")
    with Image.open(embeddings_figure) as image:
        assert image.format == "PNG"
        assert min(image.size) > MIN_FIGURE_SIDE

    text = _stream_text(notebook)
    photos = load_samples()
    photo_count = len(photos)
    caption_count = sum(len(photo.captions) for photo in photos)
    image_to_text = rf"image-to-text recall@1: \d+/{photo_count} = \d\.\d\d"
    text_to_image = rf"text-to-image recall@1: \d+/{caption_count} = \d\.\d\d"
    assert re.search(image_to_text, text), (
        f"no line matching {image_to_text!r} in:\n{text}"
    )
    assert re.search(text_to_image, text), (
        f"no line matching {text_to_image!r} in:\n{text}"
    )
    embedded = f"{caption_count} pairs embedded, 0 skipped"
    assert embedded in text, f"no line with {embedded!r} in:\n{text}"
    assert re.search(r"  1\. [+-]\d\.\d{3}  \w+", text), f"no search result in:\n{text}"
