"""Run the PyTorch reference and bt-jax side by side and compare every output.

The report lists each head output and every layer's hidden states with two
numbers: the maximum absolute difference, and the relative difference, which is
the maximum absolute difference divided by the largest absolute reference value.
A user sees where the two implementations part ways.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bt_jax
from bt_jax.config import HEAD_ARCHITECTURES, BridgeTowerConfig
from bt_jax.hub import load_config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Comparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool


@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray  # (batch, height, width, channels)
    labels: np.ndarray | None


def make_inputs(
    config: BridgeTowerConfig,
    head: str,
    *,
    batch: int,
    text_length: int,
    image_size: int | None,
    seed: int,
) -> Inputs:
    """Build random inputs: texts of different lengths with padding, random pixels."""
    text = config.text_config
    if text_length > text.max_text_length:
        raise ValueError(
            f"--text-length {text_length} exceeds the model's limit of {text.max_text_length} tokens."
        )
    if text_length < 3:
        raise ValueError("--text-length must be at least 3 (<s>, one token, </s>).")

    rng = np.random.default_rng(seed)
    special = {text.pad_token_id, text.bos_token_id, text.eos_token_id}
    ordinary = np.array([i for i in range(text.vocab_size) if i not in special])
    input_ids = np.full((batch, text_length), text.pad_token_id, np.int64)
    attention_mask = np.zeros((batch, text_length), np.int64)
    for row in range(batch):
        # Rows shrink by a few tokens each, so most of the batch carries padding.
        length = max(3, text_length - 3 * row)
        input_ids[row, 0] = text.bos_token_id
        input_ids[row, 1 : length - 1] = rng.choice(ordinary, length - 2)
        input_ids[row, length - 1] = text.eos_token_id
        attention_mask[row, :length] = 1

    size = image_size or config.vision_config.image_size
    if size < config.vision_config.patch_size:
        raise ValueError(
            f"--image-size {size} is smaller than one {config.vision_config.patch_size}-pixel "
            "patch; use at least the patch size."
        )
    pixel_values = rng.standard_normal(
        (batch, size, size, config.vision_config.num_channels), dtype=np.float32
    )
    labels = None
    if head == "mlm":
        labels = np.where(attention_mask == 1, input_ids, -100)
    elif head == "itm":
        labels = np.arange(batch) % 2
    return Inputs(input_ids, attention_mask, pixel_values, labels)


def _named_outputs(
    head: str, output, hidden_states, image_first: bool
) -> dict[str, np.ndarray]:
    """Flatten a head output and its hidden states into named NumPy arrays."""
    names = {
        "model": ("text_features", "image_features", "pooler_output"),
        "mlm": ("logits", "loss"),
        "itm": ("logits", "loss"),
        "itc": ("logits", "text_embeds", "image_embeds", "cross_embeds", "loss"),
    }[head]
    arrays = {}
    for name in names:
        value = getattr(output, name)
        if value is not None:
            arrays[name] = _to_numpy(value)
    if head == "itm":
        # What users read off an ITM model: the softmax over (no match, match).
        logits = arrays["logits"].astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        arrays["probabilities"] = (exp / exp.sum(axis=-1, keepdims=True)).astype(
            np.float32
        )
    if hidden_states is None:
        return arrays
    text_states, image_states, cross_states = hidden_states
    for i, state in enumerate(text_states):
        arrays[f"hidden.text.{i}"] = _to_numpy(state)
    for i, state in enumerate(image_states):
        state = _to_numpy(state)
        # PyTorch keeps the vision stream sequence-first: (tokens, batch, width).
        arrays[f"hidden.image.{i}"] = state if image_first else state.transpose(1, 0, 2)
    for i, (text_state, image_state) in enumerate(cross_states):
        arrays[f"hidden.cross.{i}.text"] = _to_numpy(text_state)
        arrays[f"hidden.cross.{i}.image"] = _to_numpy(image_state)
    return arrays


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(jax.device_get(value), dtype=np.float32)


def run_reference(
    source: str, head: str, inputs: Inputs, interpolate: bool
) -> dict[str, np.ndarray]:
    """Load the transformers model for `head` from `source` and run it in float32."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch_class = getattr(transformers, HEAD_ARCHITECTURES[head])
    model = torch_class.from_pretrained(source, dtype=torch.float32).eval()
    kwargs = dict(
        input_ids=torch.from_numpy(inputs.input_ids),
        attention_mask=torch.from_numpy(inputs.attention_mask),
        pixel_values=torch.from_numpy(inputs.pixel_values.transpose(0, 3, 1, 2).copy()),
        output_hidden_states=True,
    )
    if interpolate:
        kwargs["interpolate_pos_encoding"] = True
    if inputs.labels is not None:
        kwargs["labels"] = torch.from_numpy(inputs.labels)
    if head == "itc":
        kwargs["return_loss"] = True
    with torch.no_grad():
        output = model(**kwargs)
    hidden = output.hidden_states
    result = _named_outputs(head, output, hidden, image_first=False)
    del model
    return result


def run_jax(
    source: str,
    head: str,
    inputs: Inputs,
    interpolate: bool,
    dtype=jnp.float32,
    with_hidden_states: bool = True,
) -> dict[str, np.ndarray]:
    """Load the bt-jax model from `source` and run it under `jax.jit` in compute `dtype`."""
    model, _ = bt_jax.from_pretrained(source, head=head, dtype=dtype)
    graphdef, state = nnx.split(model)
    options = dict(interpolate_pos_encoding=interpolate, output_hidden_states=True)
    if head == "itc":
        options["return_loss"] = True
    labels = {} if inputs.labels is None else {"labels": jnp.asarray(inputs.labels)}

    # Compiled as bt-jax's own jitted functions are, so parity covers them.
    @functools.partial(jax.jit, compiler_options=bt_jax.compiler_options())
    def forward(state, input_ids, attention_mask, pixel_values, labels):
        model = nnx.merge(graphdef, state)
        return model(input_ids, attention_mask, pixel_values, **labels, **options)

    # GPUs and TPUs may compute float32 matmuls in reduced-precision passes by
    # default, while the reference computes them in full float32.
    precision = "highest" if dtype == jnp.float32 else None
    with jax.default_matmul_precision(precision):
        output = forward(
            state,
            jnp.asarray(inputs.input_ids),
            jnp.asarray(inputs.attention_mask),
            jnp.asarray(inputs.pixel_values),
            labels,
        )
    hidden_states = output.hidden_states if with_hidden_states else None
    return _named_outputs(head, output, hidden_states, image_first=True)


def compare(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], atol: float
) -> list[Comparison]:
    """Compare every array of `reference` with the same name in `candidate`."""
    rows = []
    for name, expected in reference.items():
        if name not in candidate:
            rows.append(
                Comparison(name, expected.shape, float("inf"), float("inf"), False)
            )
            continue
        actual = candidate[name]
        if actual.shape != expected.shape:
            rows.append(
                Comparison(name, expected.shape, float("inf"), float("inf"), False)
            )
            continue
        # A NaN anywhere makes max_abs NaN, and NaN <= atol is False, so it fails.
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        max_rel = max_abs / max(scale, 1e-12)
        ok = max_abs <= atol
        rows.append(Comparison(name, tuple(expected.shape), max_abs, max_rel, ok))
    return rows


def _nan_max(values: list[float]) -> float:
    """Maximum of `values` that is NaN when any value is NaN (Python's max is order-dependent)."""
    if any(np.isnan(values)):
        return float("nan")
    return max(values, default=0.0)


def peak_memory_gib() -> float:
    """Peak resident memory of this process, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def verify(
    source: str,
    *,
    jax_dir: str | None = None,
    head: str | None = None,
    atol: float = 1e-4,
    batch: int = 3,
    text_length: int = 16,
    image_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    only: list[str] | None = None,
) -> dict:
    """Run both implementations on the same inputs and return the report as a dict.

    The reference always runs in float32; `dtype` sets bt-jax's compute dtype.
    `only` keeps the outputs whose names match one of its glob patterns (for
    example "probabilities" or "hidden.cross.*").
    """
    started = time.perf_counter()
    config = load_config(source)
    if jax_dir is not None:
        load_config(jax_dir)
    head = head or config.default_head
    interpolate = (
        image_size is not None and image_size != config.vision_config.image_size
    )
    inputs = make_inputs(
        config,
        head,
        batch=batch,
        text_length=text_length,
        image_size=image_size,
        seed=seed,
    )
    logger.info(
        "Running the PyTorch reference (%s) from %s", HEAD_ARCHITECTURES[head], source
    )
    reference = run_reference(source, head, inputs, interpolate)
    if only:
        reference = {
            k: v
            for k, v in reference.items()
            if any(fnmatch.fnmatch(k, p) for p in only)
        }
        if not reference:
            raise ValueError(
                f"--only {','.join(only)} matches no output; names look like logits, "
                "probabilities, loss, hidden.text.3, hidden.cross.0.image."
            )
    logger.info("Running bt-jax from %s in %s", jax_dir or source, dtype)
    candidate = run_jax(
        jax_dir or source,
        head,
        inputs,
        interpolate,
        dtype=jnp.dtype(dtype),
        with_hidden_states=any(k.startswith("hidden.") for k in reference),
    )
    rows = compare(reference, candidate, atol)
    return {
        "source": os.fspath(source),
        "jax": os.fspath(jax_dir or source),
        "head": head,
        "atol": atol,
        "batch": batch,
        "text_length": text_length,
        "image_size": image_size or config.vision_config.image_size,
        "dtype": dtype,
        "passed": all(row.ok for row in rows),
        "max_abs": _nan_max([row.max_abs for row in rows]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_memory_gib": round(peak_memory_gib(), 2),
        "outputs": [dataclasses.asdict(row) for row in rows],
    }


def format_report(report: dict) -> str:
    """Render a report as a fixed-width table with a summary line."""
    rows = report["outputs"]
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [
        f"{'output':<{width}}  {'shape':<18} {'max abs':>10} {'max rel':>10}  status",
        "-" * (width + 48),
    ]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"]) or "scalar"
        status = "ok" if r["ok"] else "FAIL"
        lines.append(
            f"{r['name']:<{width}}  {shape:<18} {r['max_abs']:>10.2e} {r['max_rel']:>10.2e}  {status}"
        )
    failed = sum(not r["ok"] for r in rows)
    verdict = (
        "PASSED"
        if report["passed"]
        else f"FAILED ({failed} of {len(rows)} above tolerance)"
    )
    lines.append("-" * (width + 48))
    lines.append(
        f"{verdict}: max abs {report['max_abs']:.2e} (atol {report['atol']:.0e}), head "
        f"{report['head']}, {report['dtype']}, batch {report['batch']}, text length "
        f"{report['text_length']}, "
        f"image {report['image_size']} px, {report['wall_seconds']} s, peak memory "
        f"{report['peak_memory_gib']} GiB"
    )
    return "\n".join(lines)
