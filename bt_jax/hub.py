"""Load and save models: `from_pretrained`, `save_pretrained` and PyTorch export.

Two directory formats are read:

- a Hugging Face BridgeTower directory: `config.json` plus PyTorch weights (see
  `bt_jax.weights.io` for the file layouts);
- a bt-jax directory written by `save_pretrained`: `config.json` in the Hugging
  Face schema, `bt_jax.json` and an Orbax checkpoint of the parameters in
  `params/`, stored in Flax layout and in the dtype they were saved with.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from bt_jax import sharding
from bt_jax.config import TASK_HEADS, BridgeTowerConfig
from bt_jax.fileio import atomic_directory
from bt_jax.modeling import PRETRAINING_HEADS, create_model, head_name
from bt_jax.processing import PROCESSOR_FILES
from bt_jax.weights.io import open_checkpoint, write_safetensors
from bt_jax.weights.mapping import (
    CheckpointMismatchError,
    TensorMapping,
    canonical_key,
    plan_load,
    tensor_mappings,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METADATA_FILE = "bt_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
TIED_DECODER = "mlm_score.decoder.weight"
# Files a checkpoint directory writes itself; an extra file may not replace them.
RESERVED_FILES = (CONFIG_FILE, METADATA_FILE, PARAMS_DIR, "model.safetensors")


def load_config(path: str | os.PathLike) -> BridgeTowerConfig:
    """Read `config.json` from a checkpoint directory, with clear errors for bad paths."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(
            f"checkpoint directory not found: {directory}. Pass a Hugging Face "
            "BridgeTower directory (config.json and weights) or one written by "
            "bt_jax.save_pretrained."
        )
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file; pass the directory that contains config.json and "
            "the weights."
        )
    return BridgeTowerConfig.from_json_file(directory / CONFIG_FILE)


def is_bt_jax_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir()


@functools.lru_cache(maxsize=16)
def _abstract_parts(config_json: str, head: str, dtype: str, param_dtype: str):
    """Trace the model of a `config.json` string and return it split."""
    config = BridgeTowerConfig.from_dict(json.loads(config_json))
    return nnx.split(
        nnx.eval_shape(
            lambda: create_model(
                config, head, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype)
            )
        )
    )


def abstract_model(
    config: BridgeTowerConfig, head: str, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> nnx.Module:
    """Build the model with shapes only: no parameter memory is allocated.

    Outside a mesh, the traced model is cached per config, head and dtypes, and
    each call returns a copy: its variables are new, so setting them leaves the
    cache abstract. Static attributes such as `config` are shared with other
    calls for an equal config. Under a mesh the parameters carry its shardings,
    so the model is traced each time.

    Tracing is slow because each `nnx.Rngs` draw under a trace reads the
    tracer's `sharding`, and the error message behind that walks the whole trace
    so far. That took 0.6 s for the tiny preset's model on a 2-core CPU, against
    0.15 s to build it with real weights (timed with `create_model`).
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return nnx.eval_shape(
            lambda: create_model(config, head, dtype=dtype, param_dtype=param_dtype)
        )
    parts = _abstract_parts(
        json.dumps(config.to_dict(), sort_keys=True),
        head,
        jnp.dtype(dtype).name,
        jnp.dtype(param_dtype).name,
    )
    return nnx.merge(*parts, copy=True)


def head_of(model: nnx.Module) -> str:
    """Return the head name ("model", "mlm", "itm", "itc" or e.g. "mlm+itm") of a model."""
    return head_name(model)


def stored_heads(path: str | os.PathLike) -> tuple[str, ...]:
    """Return the heads (mlm, itm, itc, vqa, nlvr2, snli-ve) a checkpoint stores.

    Only tensor names are read, not data.
    """
    if is_bt_jax_directory(path):
        keys = _orbax_keys(Path(path))
    else:
        with open_checkpoint(path) as source:
            keys = list(source.shapes)
    prefixes = {
        "mlm": "mlm_score.",
        "itm": "itm_score.",
        "itc": "itc_text_head.",
        "vqa": "vqa_classifier.",
        "nlvr2": "nlvr2_classifier.",
        "snli-ve": "snli_classifier.",
    }
    return tuple(
        head
        for head in (*PRETRAINING_HEADS, *TASK_HEADS)
        if any(key.startswith(prefixes[head]) for key in keys)
    )


def checkpoint_head(path: str | os.PathLike) -> str:
    """Return the head that keeps every head weight a checkpoint stores.

    That is the single head, "mlm+itm+itc"-style for several, "model" for a
    bare backbone, or the fine-tuning head (vqa, nlvr2, snli-ve) when there is
    one.
    """
    heads = stored_heads(path)
    tasks = [head for head in heads if head in TASK_HEADS]
    if tasks:
        return tasks[0]
    return "+".join(heads) if heads else "model"


def from_pretrained(
    path: str | os.PathLike,
    *,
    head: str | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    init_missing_heads: bool = False,
    seed: int = 0,
    config: BridgeTowerConfig | None = None,
) -> tuple[nnx.Module, nnx.State]:
    """Load a model and its parameters from a checkpoint directory.

    Args:
      path: a Hugging Face BridgeTower directory or a bt-jax directory.
      head: "model", "mlm", "itm", "itc", or several of mlm, itm and itc joined
        by "+" (`BridgeTowerForPreTraining`). None follows `bt_jax.json` in a
        bt-jax directory, else `architectures` in config.json.
      dtype: compute dtype of matmuls and convolutions (LayerNorm and softmax
        always run in float32).
      param_dtype: dtype to store parameters in; None keeps the checkpoint's.
      mesh: place each parameter sharded over this mesh as it is read, by the
        logical-axis `rules`, so the full model never sits on one device.
      init_missing_heads: initialise head weights the checkpoint lacks at random
        (with a warning) instead of raising. Useful to start fine-tuning a head
        from a backbone checkpoint.
      seed: seed of that random initialisation.
      config: use this config instead of the checkpoint's `config.json`, for
        example to give sizes to a head the checkpoint lacks. The stored
        weights must still match it.

    Returns:
      `(model, params)`: the NNX module with weights loaded, and its parameter
      state, a pytree to pass through `jax.jit` (`nnx.split` / `nnx.merge`).

    Raises:
      FileNotFoundError: the directory, config.json or the weights are missing.
      ValueError: config.json is not a valid BridgeTower config, or the weights do
        not match it (`CheckpointMismatchError`, `CheckpointFileError`).
    """
    config = config or load_config(path)
    head = head or _saved_head(path) or config.default_head
    model = abstract_model(
        config, head, dtype=dtype, param_dtype=param_dtype or jnp.float32
    )
    abstract_params = nnx.state(model, nnx.Param)
    shardings = None
    if mesh is not None:
        flat_shardings = nnx.to_flat_state(
            sharding.param_shardings(abstract_params, mesh, rules)
        )
        shardings = {tuple(p): v.get_value() for p, v in flat_shardings}

    def target_sharding(path):
        return None if shardings is None else shardings[path]

    values: dict[tuple, jax.Array] = {}
    missing: list[TensorMapping] = []
    for mapping, array in iter_checkpoint_params(
        path,
        model,
        init_missing_heads=init_missing_heads,
        target_shardings=target_sharding,
    ):
        if array is None:
            missing.append(mapping)
            continue
        if param_dtype is not None and array.dtype != param_dtype:
            array = array.astype(param_dtype)
        if isinstance(array, np.ndarray):
            array = sharding.put_array(array, target_sharding(mapping.path))
        values[mapping.path] = array
    if missing:
        values.update(
            _init_params(config, head, param_dtype, seed, missing, target_sharding)
        )

    flat = [
        (tuple(p), v.replace(value=values[tuple(p)]))
        for p, v in nnx.to_flat_state(abstract_params)
    ]
    nnx.update(model, nnx.from_flat_state(flat))
    return model, nnx.state(model, nnx.Param)


def _saved_head(path: str | os.PathLike) -> str | None:
    metadata = Path(path) / METADATA_FILE
    if not metadata.is_file():
        return None
    try:
        head = json.loads(metadata.read_text(encoding="utf-8")).get("head")
    except (OSError, json.JSONDecodeError, AttributeError):
        logger.warning("Ignoring unreadable %s", metadata)
        return None
    return head if isinstance(head, str) else None


def iter_checkpoint_params(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    init_missing_heads: bool = False,
    target_shardings=lambda path: None,
) -> Iterator[tuple[TensorMapping, np.ndarray | jax.Array | None]]:
    """Yield `(mapping, value)` for every parameter of `model`, in Flax layout.

    Values keep the dtype they are stored with. Hugging Face checkpoints are read
    one tensor at a time as NumPy arrays; bt-jax checkpoints are restored by Orbax
    straight onto `target_shardings(path)`. The value is None for a head tensor
    the checkpoint lacks when `init_missing_heads` is True.
    """
    mappings = tensor_mappings(model)
    if is_bt_jax_directory(path):
        yield from _iter_orbax_params(
            Path(path), mappings, init_missing_heads, target_shardings
        )
        return
    with open_checkpoint(path) as source:
        aliases = _ln_separate_aliases(model.config, mappings, source.shapes)
        shapes = {**source.shapes, **{k: source.shapes[v] for k, v in aliases.items()}}
        if model.config.tie_word_embeddings:
            # A tied decoder is the word-embedding table; some writers store it twice.
            for key in [k for k in shapes if canonical_key(k) == TIED_DECODER]:
                logger.debug("Dropping %s: it is tied to the word embeddings", key)
                del shapes[key]
        plan = plan_load(
            mappings,
            shapes,
            source=source.description,
            init_missing_heads=init_missing_heads,
        )
        for mapping in mappings:
            key = plan.sources.get(mapping.key)
            key = aliases.get(key, key)
            yield mapping, (None if key is None else mapping.to_flax(source[key]))


def _ln_separate_aliases(
    config: BridgeTowerConfig, mappings: list[TensorMapping], shapes: dict
) -> dict[str, str]:
    """Map absent `ln_separate` tensors to `ln_post` when the config requests it.

    With `share_layernorm=False` and `init_layernorm_from_vision_encoder=True`, the
    per-layer LayerNorms start from the vision encoder's `ln_post`, as the original
    BridgeTower code does when it builds the model from a CLIP checkpoint that has
    no per-layer LayerNorms.
    """
    if (
        config.vision_config.share_layernorm
        or not config.init_layernorm_from_vision_encoder
    ):
        return {}
    present = {canonical_key(k): k for k in shapes}
    aliases = {}
    for mapping in mappings:
        canonical = canonical_key(mapping.key)
        if ".visual.ln_separate." not in canonical or canonical in present:
            continue
        leaf = canonical.rsplit(".", 1)[1]
        post = present.get(f"vision_model.visual.ln_post.{leaf}")
        if post is not None:
            aliases[mapping.key] = post
    if aliases:
        logger.info("Initialising %d ln_separate tensors from ln_post", len(aliases))
    return aliases


def _flax_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


RECREATE = "Re-create it with bt_jax.save_pretrained or `python -m convert to-jax`."


def _orbax_metadata(directory: Path) -> dict:
    """Return {flat key: array metadata} of a bt-jax directory's parameters."""
    params_dir = (directory / PARAMS_DIR).absolute()
    try:
        item_metadata = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    except Exception as err:  # Orbax raises several error types for damaged checkpoints
        raise ValueError(
            f"cannot read the Orbax checkpoint in {params_dir}: {err}. {RECREATE}"
        ) from None
    if item_metadata is None:
        raise ValueError(
            f"{params_dir} has no Orbax checkpoint metadata; the checkpoint is incomplete "
            f"or damaged. {RECREATE}"
        )
    return dict(_flatten_tree(item_metadata.tree))


def _orbax_keys(directory: Path) -> list[str]:
    return list(_orbax_metadata(directory))


def _iter_orbax_params(directory, mappings, init_missing_heads, target_shardings):
    params_dir = (directory / PARAMS_DIR).absolute()
    checkpointer = ocp.StandardCheckpointer()
    recreate = RECREATE
    stored = _orbax_metadata(directory)

    # The bt-jax layout is the Flax one, so a mapping onto itself reuses the
    # PyTorch loading rules (prefix handling, foreign heads, strict accounting).
    flax_mappings = [
        TensorMapping(m.path, _flax_key(m.path), m.flax_shape, m.flax_shape, "same")
        for m in mappings
    ]
    plan = plan_load(
        flax_mappings,
        {key: tuple(meta.shape) for key, meta in stored.items()},
        source=str(params_dir),
        init_missing_heads=init_missing_heads,
    )

    # Restore every stored array straight onto its target sharding.
    by_key = {_flax_key(m.path): m for m in mappings}
    path_of = {plan.sources[k]: by_key[k].path for k in plan.sources}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for key, meta in stored.items():
        place = target_shardings(path_of[key]) if key in path_of else None
        target[key] = jax.ShapeDtypeStruct(
            tuple(meta.shape), meta.dtype, sharding=place or default
        )
    try:
        restored = dict(
            _flatten_tree(checkpointer.restore(params_dir, _unflatten_tree(target)))
        )
    except Exception as err:  # TensorStore and Orbax raise plain Exceptions on bad data
        # TensorStore appends a spec of a hundred lines; its first line is the reason.
        reason = str(err).splitlines()[0].split(" See full TensorStore details")[0]
        reason = reason.rstrip(".")
        raise ValueError(
            f"cannot read the parameter data in {params_dir}: {reason}. The checkpoint "
            f"files are damaged or incomplete. {recreate}"
        ) from None

    for mapping in mappings:
        key = plan.sources.get(_flax_key(mapping.path))
        yield mapping, (None if key is None else restored[key])


def _flatten_tree(tree, prefix=()) -> Iterator[tuple[str, object]]:
    if isinstance(tree, dict):
        for name, child in tree.items():
            yield from _flatten_tree(child, (*prefix, str(name)))
    else:
        yield ".".join(prefix), tree


def _unflatten_tree(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _init_params(config, head, param_dtype, seed, missing, target_sharding):
    """Initialise only the `missing` parameters, by the model's own initialisers."""
    requested = {m.path for m in missing}

    @jax.jit
    def init():
        model = create_model(
            config, head, param_dtype=param_dtype or jnp.float32, seed=seed
        )
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        # Only the requested leaves are returned, so XLA drops the rest of the init.
        return {_flax_key(p): v.get_value() for p, v in flat if tuple(p) in requested}

    arrays = init()
    return {
        m.path: jax.device_put(arrays[_flax_key(m.path)], target_sharding(m.path))
        for m in missing
    }


def _model_and_config(model_or_config) -> tuple[BridgeTowerConfig, str]:
    if isinstance(model_or_config, BridgeTowerConfig):
        return model_or_config, model_or_config.default_head
    if isinstance(model_or_config, nnx.Module) and hasattr(model_or_config, "config"):
        return model_or_config.config, head_of(model_or_config)
    raise TypeError(
        f"expected a bt-jax model or a BridgeTowerConfig, got {type(model_or_config).__name__}."
    )


def _flat_params(params: nnx.State) -> dict[tuple, jax.Array]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(params)}


def save_pretrained(
    model_or_config,
    params: nnx.State,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write `config.json`, `bt_jax.json` and an Orbax checkpoint of `params` to `path`.

    `extra_files` (such as the tokenizer and `preprocessor_config.json`) are
    copied in beside them. The directory appears only once everything is
    written; a failure leaves no partial directory behind.
    """
    config, head = _model_and_config(model_or_config)
    model = abstract_model(config, head)
    expected = {m.path: m.flax_shape for m in tensor_mappings(model)}
    flat = _flat_params(params)
    _check_params_match(expected, flat)
    tree = _unflatten_tree({_flax_key(p): v for p, v in flat.items()})
    with atomic_directory(path, overwrite=overwrite) as staging:
        config.with_head(head).to_json_file(staging / CONFIG_FILE)
        with open(staging / METADATA_FILE, "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, "head": head}, f, indent=2)
            f.write("\n")
        checkpointer = _this_process_checkpointer()
        checkpointer.save((staging / PARAMS_DIR).absolute(), tree)
        checkpointer.wait_until_finished()
        _copy_files(extra_files, staging)
    logger.info("Saved %s (%s head, %d tensors)", path, head, len(flat))
    return Path(path)


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """Return a checkpointer that writes from this process alone.

    In a multi-process job the other processes do not take part, so the
    parameters must be host arrays (numpy) or fully addressable here.
    """
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    index = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=index,
            active_processes={index},
            barrier_sync_key_prefix=f"bt_jax_save_{index}",
        )
    )


def _check_params_match(
    expected: dict[tuple, tuple], flat: dict[tuple, jax.Array]
) -> None:
    missing = sorted(_flax_key(p) for p in expected if p not in flat)
    unknown = sorted(_flax_key(p) for p in flat if p not in expected)
    wrong = sorted(
        f"{_flax_key(p)}: {tuple(flat[p].shape)} != {shape}"
        for p, shape in expected.items()
        if p in flat and tuple(flat[p].shape) != shape
    )
    if missing or unknown or wrong:
        raise CheckpointMismatchError(
            "params do not match the model's config: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"unknown {unknown}" if unknown else "",
                    f"wrong shapes {wrong}" if wrong else "",
                )
                if part
            )
        )


def _copy_files(files: Iterable[str | os.PathLike], directory: Path) -> None:
    for file in files:
        source = Path(file)
        if source.name in RESERVED_FILES:
            raise ValueError(
                f"extra file {source} would overwrite the checkpoint's own "
                f"{source.name}; rename it or leave it out."
            )
        shutil.copyfile(source, directory / source.name)


def processor_files(path: str | os.PathLike) -> list[Path]:
    """List the processor and tokenizer files present in a checkpoint directory."""
    return [
        Path(path) / name for name in PROCESSOR_FILES if (Path(path) / name).is_file()
    ]


def torch_state_dict(model_or_config, params: nnx.State) -> dict[str, np.ndarray]:
    """Convert `params` to a PyTorch-layout state dict of NumPy arrays (dtypes kept)."""
    config, head = _model_and_config(model_or_config)
    flat = _flat_params(params)
    mappings = tensor_mappings(abstract_model(config, head))
    _check_params_match({m.path: m.flax_shape for m in mappings}, flat)
    return {
        m.key: m.to_torch(np.asarray(jax.device_get(flat[m.path]))) for m in mappings
    }


def save_torch_checkpoint(
    model_or_config,
    params: nnx.State,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a Hugging Face directory (`config.json`, `model.safetensors`) that
    transformers' `from_pretrained` loads with no missing or unexpected keys.

    A multi-head model's extra heads are stored too; transformers then reports
    them as unused by the class `config.json` names. `extra_files` are copied
    in beside the weights."""
    config, head = _model_and_config(model_or_config)
    tensors = torch_state_dict(model_or_config, params)
    with atomic_directory(path, overwrite=overwrite) as staging:
        config.with_head(head).to_json_file(staging / CONFIG_FILE)
        write_safetensors(tensors, staging / "model.safetensors")
        _copy_files(extra_files, staging)
    logger.info(
        "Wrote %s (%s head as %s, %d tensors)",
        path,
        head,
        config.with_head(head).architectures[0],
        len(tensors),
    )
    return Path(path)
