"""Shared helpers: random PyTorch reference models, inputs, and output comparison.

Parity tests build a random transformers model, perturb every parameter (so a
swapped LayerNorm scale and bias, or an untrained link-tower scalar, cannot hide),
save it as real checkpoint files and load those with bt-jax.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bt_jax.config import HEAD_ARCHITECTURES, load_preset

REPO = Path(__file__).resolve().parents[1]
TINY = load_preset(REPO / "configs" / "tiny.py").to_dict()
BASE = load_preset(REPO / "configs" / "base.py").to_dict()

# Environment for subprocesses that compile like `fast_compile` tests
# (tests/conftest.py), without LLVM's optimisations.
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def tiny_config(**overrides) -> dict:
    """Return the tiny preset as a config.json dict with `overrides` applied.

    `text_config` and `vision_config` overrides are merged into the sub-dicts.
    """
    config = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if key in ("text_config", "vision_config"):
            config[key].update(value)
        else:
            config[key] = value
    return config


def torch_model(config: dict, head: str, *, seed: int = 0) -> torch.nn.Module:
    """Build a transformers model for `head` and perturb all of its parameters."""
    torch.manual_seed(seed)
    cls = getattr(transformers, HEAD_ARCHITECTURES[head])
    model = cls(transformers.BridgeTowerConfig.from_dict(config)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if name.endswith(("scaled_factor", "beta")):
                param.copy_(
                    0.3 + 0.2 * noise.abs()
                )  # away from the init values 1 and 0.5
            elif param.ndim <= 1:
                param.add_(0.1 * noise)  # LayerNorm scales and all biases leave 1 and 0
    return model


def save_torch_model(model: torch.nn.Module, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def make_batch(
    config: dict,
    *,
    batch: int = 3,
    length: int = 9,
    image_size: int | None = None,
    seed: int = 0,
    empty_row: bool = True,
) -> dict[str, np.ndarray]:
    """Build texts of different lengths and random pixels in JAX layout.

    Row 0 uses the whole length and contains a pad token id in the middle. Later
    rows are shorter and padded. With `empty_row`, the last row's attention mask
    is all zeros.
    """
    text = config["text_config"]
    rng = np.random.default_rng(seed)
    input_ids = np.full((batch, length), text["pad_token_id"], np.int64)
    mask = np.zeros((batch, length), np.int64)
    for row in range(batch):
        size = max(3, length - 2 * row)
        input_ids[row, 0] = text["bos_token_id"]
        input_ids[row, 1 : size - 1] = rng.integers(3, text["vocab_size"], size - 2)
        input_ids[row, size - 1] = text["eos_token_id"]
        mask[row, :size] = 1
    input_ids[0, length // 2] = text["pad_token_id"]  # a pad id inside a real sentence
    if empty_row:
        mask[-1] = 0
    side = image_size or config["vision_config"]["image_size"]
    channels = config["vision_config"].get("num_channels", 3)
    pixels = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def head_kwargs(head: str, batch: dict[str, np.ndarray]) -> dict:
    """Labels for the heads that compute a loss."""
    if head == "mlm":
        return {
            "labels": np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
        }
    if head == "itm":
        return {"labels": np.arange(len(batch["input_ids"])) % 2}
    if head == "itc":
        return {"return_loss": True}
    return {}


OUTPUT_NAMES = {
    "model": ("text_features", "image_features", "pooler_output"),
    "mlm": ("logits", "loss"),
    "itm": ("logits", "loss"),
    "itc": ("logits", "text_embeds", "image_embeds", "cross_embeds", "loss"),
}


def run_torch(model, head: str, batch: dict, **options) -> dict[str, np.ndarray]:
    """Run the reference and return its outputs and hidden states by name."""
    kwargs = {
        "input_ids": torch.from_numpy(batch["input_ids"]),
        "attention_mask": torch.from_numpy(batch["attention_mask"]),
        "pixel_values": torch.from_numpy(
            batch["pixel_values"].transpose(0, 3, 1, 2).copy()
        ),
        "output_hidden_states": True,
    }
    for key, value in {**head_kwargs(head, batch), **options}.items():
        kwargs[key] = (
            torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        )
    with torch.no_grad():
        output = model(**kwargs)
    named = {n: getattr(output, n).numpy() for n in OUTPUT_NAMES[head]}
    text, image, cross = output.hidden_states
    named.update({f"text.{i}": t.numpy() for i, t in enumerate(text)})
    # The reference returns vision states sequence-first: (tokens, batch, width).
    named.update(
        {f"image.{i}": t.numpy().transpose(1, 0, 2) for i, t in enumerate(image)}
    )
    for i, (t, v) in enumerate(cross):
        named[f"cross.{i}.text"] = t.numpy()
        named[f"cross.{i}.image"] = v.numpy()
    return named


def run_jax(
    model, head: str, batch: dict, *, output_hidden_states: bool = True, **options
) -> dict[str, np.ndarray]:
    """Run a bt-jax model on the same batch and name its outputs like `run_torch`.

    Without `output_hidden_states`, only the head's outputs are returned.
    """
    kwargs = {
        k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
        for k, v in head_kwargs(head, batch).items()
    }
    output = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
        output_hidden_states=output_hidden_states,
        **kwargs,
        **options,
    )
    named = {n: np.asarray(getattr(output, n)) for n in OUTPUT_NAMES[head]}
    if not output_hidden_states:
        return named
    text, image, cross = output.hidden_states
    named.update({f"text.{i}": np.asarray(t) for i, t in enumerate(text)})
    named.update({f"image.{i}": np.asarray(t) for i, t in enumerate(image)})
    for i, (t, v) in enumerate(cross):
        named[f"cross.{i}.text"] = np.asarray(t)
        named[f"cross.{i}.image"] = np.asarray(v)
    return named


def assert_outputs_close(expected: dict, actual: dict, atol: float) -> None:
    """Assert that every named output matches, listing each one that does not."""
    assert sorted(actual) == sorted(expected), "output names differ"
    failures = []
    for name, reference in expected.items():
        value = actual[name]
        if value.shape != reference.shape:
            failures.append(f"{name}: shape {value.shape} != {reference.shape}")
            continue
        if not np.isfinite(value).all():
            failures.append(f"{name}: contains NaN or inf")
            continue
        error = (
            float(np.abs(value.astype(np.float64) - reference).max())
            if value.size
            else 0.0
        )
        if error > atol:
            failures.append(f"{name}: max abs diff {error:.2e} > {atol:.0e}")
    assert not failures, "outputs differ from PyTorch:\n" + "\n".join(failures)


def run_convert(*args) -> subprocess.CompletedProcess:
    """Run `python -m convert ARGS` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def sample_config(**overrides) -> dict:
    """Return the tiny preset with room for a tokenizer trained on sample captions."""
    config = tiny_config(**overrides)
    config["text_config"]["vocab_size"] = 1000
    config["vision_config"]["image_size"] = 64
    return config


def save_multihead_checkpoint(
    directory: Path, config: dict, *, seed: int = 0, itm_scale: float = 1.0
) -> dict[str, torch.nn.Module]:
    """Save one checkpoint with the MLM, ITM and ITC heads on one backbone.

    This is the layout of the hub's bridgetower-large-itm-mlm-itc: the ITC class
    in `architectures`, and every head's tensors in `model.safetensors`. Returns
    the three reference models, each reloaded from the directory by transformers
    (which loads its own head and ignores the others). `itm_scale` multiplies the
    ITM weights, which spreads a random model's match scores apart so that
    rankings do not hinge on near-ties.
    """
    from bt_jax.weights.io import write_safetensors

    itc = torch_model(config, "itc", seed=seed)
    state = {k: v.numpy() for k, v in itc.state_dict().items()}
    for offset, head in enumerate(("itm", "mlm"), start=1):
        other = torch_model(config, head, seed=seed + 10 * offset)
        state.update(
            {
                k: v.numpy()
                for k, v in other.state_dict().items()
                if not k.startswith("bridgetower.")
            }
        )
    state["itm_score.fc.weight"] = state["itm_score.fc.weight"] * itm_scale
    directory.mkdir(parents=True, exist_ok=True)
    itc.config.save_pretrained(directory)
    write_safetensors(state, directory / "model.safetensors")
    models = {}
    for head in ("mlm", "itm", "itc"):
        cls = getattr(transformers, HEAD_ARCHITECTURES[head])
        model, info = cls.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"], info["missing_keys"]
        assert not info["mismatched_keys"], info["mismatched_keys"]
        models[head] = model.eval()
    return models


def ynn_fusion_ops(hlo_text: str) -> list[set[str]]:
    """Return the HLO opcodes inside each YNNPACK fusion of a compiled CPU program.

    Parameters and bitcasts are left out, so a lone matmul reads as {"dot"}.
    """
    bodies = {}
    for match in re.finditer(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", hlo_text, re.M | re.S):
        bodies[match.group(1)] = match.group(2)
    fusions = []
    for line in hlo_text.splitlines():
        if "__ynn_fusion" not in line:
            continue
        called = re.search(r"calls=%([\w.\-]+)", line).group(1)
        ops = set(re.findall(r"= \S+ ([a-z][\w\-]*)\(", bodies[called]))
        fusions.append(ops - {"parameter", "bitcast"})
    return fusions
