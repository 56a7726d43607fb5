"""Read the original microsoft/BridgeTower PyTorch Lightning checkpoints.

The original training code (github.com/microsoft/BridgeTower, `BTTransformer` in
`src/modules/bt_module.py`) saves `.ckpt` files: a pickled dict with the weights
under "state_dict" and, normally, the run's settings under "hyper_parameters"
(`{"config": {...}}`, with the keys of that repository's `src/config.py`). This
module renames those weights to the Hugging Face names, derives a
`BridgeTowerConfig` and a head from the settings, and leaves loading to the
strict loader of `bt_jax.weights.mapping`. `python -m convert to-jax FILE.ckpt
OUT` runs the whole conversion.

Key names. The Hugging Face port kept the original module names except these
(original key, then Hugging Face key):

- `text_transformer.*`: `text_model.*`
- `vit_model.visual.conv1.weight`:
  `vision_model.visual.embeddings.patch_embedding.weight`
- `vit_model.visual.class_embedding`:
  `vision_model.visual.embeddings.class_embedding`
- `vit_model.visual.positional_embedding`:
  `vision_model.visual.embeddings.position_embedding.weight`
- `vit_model.visual.{ln_pre,ln_post,ln_separate,transformer}.*`:
  `vision_model.visual.` followed by the same name
- `temperature`: `logit_scale`, which is ln(1 / temperature)

The cross-modal layers, transforms, poolers, link towers, `token_type_embeddings`
and the heads `mlm_score`, `itm_score`, `itc_text_head`, `itc_image_head`,
`vqa_classifier`, `nlvr2_classifier` and `snli_classifier` keep their names.
Dropped and listed in the report: the CLIP text tower's parameters that the
original's CLIP builder keeps but never uses (`vit_model.positional_embedding`,
`vit_model.ln_final.*`) and RoBERTa's `position_ids` buffer. `rank_output` (the
ITM-ranking retrieval head) has no bt-jax counterpart and is rejected. Any other
key raises `CheckpointMismatchError`.

Numerical differences that no conversion removes. The converted model computes
what the Hugging Face port computes, which differs slightly from the original:

- LayerNorm epsilon. The original builds its cross-modal layers and MLM head
  from a fresh `RobertaConfig`. Its `layer_norm_eps` default is 1e-12 in
  transformers 4.17, the version the original pins, and the port uses 1e-5
  there. The RoBERTa and CLIP encoders, link towers and task heads use 1e-5 in
  both.
- Attention mask value. The original adds -10000 to the scores of padding
  tokens (transformers 4.17's extended attention mask), and the port adds the
  dtype's minimum. Only rows whose mask is almost all padding notice.
- CLIP LayerNorm. The original's CLIP LayerNorm casts its input to float32 and
  the result back. In float32 both agree. bt-jax keeps every LayerNorm in
  float32 in reduced precision too, but rounds the other operations differently.
- ITC heads. Both read the CLS token of the last text layer. For the image, the
  original applies `itc_image_head` to the `ln_post` output of the last vision
  block, while the port first applies `cross_modal_image_transform` and adds
  token-type row 1. The original also has no `itc_cross_modal_head`, so bt-jax's
  ITC head (the port's `BridgeTowerForContrastiveLearning`) can only start that
  head from random weights (`init_missing_heads`), and its image embeddings are
  not the original's. The similarity scale matches: exp(logit_scale) equals
  1 / temperature.
- Per-layer vision LayerNorms. Trained with `vit_layernorm_shared=False`, the
  original normalises each bridged vision layer with its own `ln_separate`, but
  the port always uses `ln_post`. No released checkpoint uses that setting.

Loading is safe: `torch.load(weights_only=True)` never runs code from the file.
Lightning's `AttributeDict` and sacred's read-only containers are rebuilt as
plain dicts and lists by name. Any other class or function in the pickle makes
loading fail with a message that names it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bt_jax.config import TASK_HEADS, BridgeTowerConfig
from bt_jax.weights.io import (
    WEIGHT_FILES,
    CheckpointFileError,
    _import_torch,
    torch_tensor_to_numpy,
)
from bt_jax.weights.mapping import CheckpointMismatchError

logger = logging.getLogger(__name__)

SUFFIX = ".ckpt"

_EXACT_RENAMES = {
    "vit_model.visual.conv1.weight": (
        "vision_model.visual.embeddings.patch_embedding.weight"
    ),
    "vit_model.visual.class_embedding": (
        "vision_model.visual.embeddings.class_embedding"
    ),
    "vit_model.visual.positional_embedding": (
        "vision_model.visual.embeddings.position_embedding.weight"
    ),
    "temperature": "logit_scale",
}
_PREFIX_RENAMES = {
    "text_transformer.": "text_model.",
    "vit_model.visual.ln_pre.": "vision_model.visual.ln_pre.",
    "vit_model.visual.ln_post.": "vision_model.visual.ln_post.",
    "vit_model.visual.ln_separate.": "vision_model.visual.ln_separate.",
    "vit_model.visual.transformer.resblocks.": (
        "vision_model.visual.transformer.resblocks."
    ),
}
_SAME_NAME_MODULES = (
    "cross_modal_text_transform",
    "cross_modal_image_transform",
    "token_type_embeddings",
    "cross_modal_text_layers",
    "cross_modal_image_layers",
    "cross_modal_text_pooler",
    "cross_modal_image_pooler",
    "cross_modal_text_layernorm",
    "cross_modal_image_layernorm",
    "cross_modal_text_link_tower",
    "cross_modal_image_link_tower",
    "mlm_score",
    "itm_score",
    "itc_text_head",
    "itc_image_head",
    "vqa_classifier",
    "nlvr2_classifier",
    "snli_classifier",
)
# Keys of the CLIP text tower. `build_model` in the original's `clip_model.py`
# keeps `positional_embedding` and `ln_final`, and OpenAI's CLIP files add the rest.
_CLIP_TEXT_TOWER = (
    "vit_model.positional_embedding",
    "vit_model.ln_final.",
    "vit_model.token_embedding.",
    "vit_model.text_projection",
    "vit_model.logit_scale",
    "vit_model.transformer.",
)
_TEXT_BUFFERS = (
    "text_transformer.embeddings.position_ids",
    "text_transformer.embeddings.token_type_ids",
)

# The loss name of each fine-tuning head in the original's `loss_names`.
_TASK_LOSSES = {"vqa": "vqa", "nlvr2": "nlvr2", "snli-ve": "snli"}
TASK_HEAD_MODULES = {
    "vqa": "vqa_classifier",
    "nlvr2": "nlvr2_classifier",
    "snli-ve": "snli_classifier",
}
# Class names in label order. NLVR2's target is `answer == "True"`, and the
# original's `write_snli.py` numbers contradiction 0, neutral 1, entailment 2.
TASK_LABELS = {
    "nlvr2": ("False", "True"),
    "snli-ve": ("contradiction", "neutral", "entailment"),
}

# Backbones the original builds by name (`src/config.py`, named configs clip16,
# clip14_large, text_roberta, text_roberta_large).
_VISION_BACKBONES = {
    "vit-b-16": {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16},
    "vit-b-32": {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 32},
    "vit-l-14": {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14},
}
_TEXT_BACKBONES = {
    "roberta-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "roberta-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}

# Dict and list subclasses that Lightning and sacred write into checkpoints.
# weights_only loading rejects classes it does not know, so these names are
# rebuilt as plain dicts and lists, and no code of those packages runs.
_CONTAINER_STAND_INS = [
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "sacred.config.custom_containers.ReadOnlyDict"),
    (list, "sacred.config.custom_containers.ReadOnlyList"),
]


@dataclasses.dataclass(frozen=True)
class OriginalCheckpoint:
    """Weights and settings read from an original `.ckpt` file.

    `state_dict` keeps the original key names. `run_config` is the run's config
    dict (`hyper_parameters["config"]`), or None when the file has none.
    """

    path: Path
    state_dict: dict[str, np.ndarray]
    run_config: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Renamed and dropped keys of one `original_to_hf_state_dict` call."""

    renamed: dict[str, str]  # original key -> Hugging Face key
    dropped: dict[str, str]  # original key -> reason

    def summary(self) -> str:
        """Describe the renaming in one line per dropped key."""
        lines = [f"{len(self.renamed)} tensors renamed, {len(self.dropped)} dropped"]
        lines += [
            f"  dropped {key}: {why}" for key, why in sorted(self.dropped.items())
        ]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class OriginalConversion:
    """An original checkpoint ready for the Hugging Face loading path."""

    config: BridgeTowerConfig  # `architectures` names `head`
    head: str
    state_dict: dict[str, np.ndarray]  # Hugging Face key names
    report: ConversionReport


def is_original_checkpoint(obj_or_path: Any) -> bool:
    """Tell whether a path or a loaded object is an original BridgeTower checkpoint.

    A path counts when it ends in `.ckpt`, or when it is a directory that contains
    `.ckpt` files and no Hugging Face or bt-jax weights. An object counts when it
    is a Lightning checkpoint dict, or a state dict, with original key names.
    """
    if isinstance(obj_or_path, (str, os.PathLike)):
        path = Path(obj_or_path)
        if path.suffix == SUFFIX:
            return True
        if not path.is_dir() or (path / "params").is_dir():
            return False
        if any((path / name).is_file() for name in WEIGHT_FILES):
            return False
        return any(path.glob(f"*{SUFFIX}"))
    if isinstance(obj_or_path, Mapping):
        state = obj_or_path.get("state_dict", obj_or_path)
        return isinstance(state, Mapping) and any(
            isinstance(key, str) and key.startswith(("text_transformer.", "vit_model."))
            for key in state
        )
    return False


def find_original_checkpoint(path: str | os.PathLike) -> Path:
    """Return the `.ckpt` file at `path`, or the only one in the directory `path`."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise FileNotFoundError(
                f"{path} must contain exactly one {SUFFIX} file, found {names}; "
                "pass the file itself."
            )
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def load_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Read an original `.ckpt` file, or the one in a directory, without running code.

    Raises:
      FileNotFoundError: no such file, or a directory without exactly one `.ckpt`.
      CheckpointFileError: the file is corrupt, contains classes that a weights-only
        load does not rebuild, or has no state dict of tensors.
    """
    torch = _import_torch()
    path = find_original_checkpoint(path)
    with torch.serialization.safe_globals(_CONTAINER_STAND_INS):
        try:
            data = torch.load(
                path,
                map_location="cpu",
                weights_only=True,
                mmap=zipfile.is_zipfile(path),
            )
        except pickle.UnpicklingError as err:
            raise CheckpointFileError(_unsafe_message(path, err)) from None
        except Exception as err:  # torch raises RuntimeError, EOFError and more
            raise CheckpointFileError(
                f"cannot load {path} with torch.load(weights_only=True): {err}. The "
                "file may be truncated or corrupt."
            ) from None
    if not isinstance(data, dict):
        raise CheckpointFileError(
            f"{path} contains a {type(data).__name__}, not a Lightning checkpoint dict."
        )
    state = data.get("state_dict", data)
    not_tensors = sorted(
        str(key)
        for key, value in (state.items() if isinstance(state, dict) else ())
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    )
    if not isinstance(state, dict) or not state or not_tensors:
        raise CheckpointFileError(
            f"{path} has no state dict of tensors under 'state_dict' (entries that "
            f"are not tensors: {not_tensors[:5]})."
        )
    arrays = {key: _as_numpy(tensor, torch) for key, tensor in state.items()}
    return OriginalCheckpoint(path, arrays, _run_config(data, path))


def _unsafe_message(path: Path, err: Exception) -> str:
    torch = _import_torch()
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy or damaged file: fall back to torch's message
        names = []
    found = ", ".join(names) if names else str(err).splitlines()[0]
    return (
        f"cannot load {path} safely: it contains objects that a weights-only load "
        f"does not rebuild ({found}), and bt-jax never unpickles arbitrary objects. "
        "If you trust the file, re-save its weights and settings where the packages "
        "that wrote it are installed: ckpt = torch.load(path, weights_only=False); "
        "torch.save({'state_dict': ckpt['state_dict'], 'hyper_parameters': "
        "{'config': dict(ckpt['hyper_parameters']['config'])}}, 'clean.ckpt')."
    )


def _as_numpy(tensor, torch) -> np.ndarray:
    """Return a NumPy view of a CPU tensor, or a copy for bfloat16 (NumPy has none)."""
    if tensor.dtype == torch.bfloat16 or not tensor.is_contiguous():
        return torch_tensor_to_numpy(tensor)
    return tensor.detach().numpy()


def _run_config(data: dict, path: Path) -> dict[str, Any] | None:
    """Return `hyper_parameters["config"]`, or None when the file has none."""
    hparams = data.get("hyper_parameters")
    if hparams is None:
        return None
    if isinstance(hparams, Mapping) and isinstance(hparams.get("config"), Mapping):
        return dict(hparams["config"])
    if isinstance(hparams, Mapping) and "vit" in hparams:
        return dict(hparams)
    logger.warning(
        "Ignoring the hyper-parameters of %s: expected {'config': {...}} with the "
        "original's settings, found keys %s",
        path,
        sorted(map(str, hparams))[:10] if isinstance(hparams, Mapping) else hparams,
    )
    return None


def original_to_hf_state_dict(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], ConversionReport]:
    """Rename an original state dict to the keys of transformers' `BridgeTowerModel`.

    Backbone keys come out without the `bridgetower.` prefix of the head classes;
    head keys keep their names. `temperature` becomes `logit_scale` =
    ln(1 / temperature). Values other than the temperature pass through as they
    are.

    Raises:
      CheckpointMismatchError: `rank_output` is present, or keys that an original
        BridgeTower checkpoint does not have; the message names them.
    """
    ranking = sorted(key for key in state_dict if key.startswith("rank_output."))
    if ranking:
        raise CheckpointMismatchError(
            f"the checkpoint contains {', '.join(ranking)}, the ITM-ranking head of "
            "the original's image-text retrieval recipe (loss 'irtr'), which bt-jax "
            "does not support. Fine-tune retrieval with the ITM+ITC recipe instead "
            "(the ITM and ITC heads, BridgeTowerForPreTraining with "
            "heads='itm+itc'), or convert a checkpoint trained with it."
        )
    renamed, dropped, unknown = {}, {}, []
    converted: dict[str, Any] = {}
    for key, value in state_dict.items():
        reason = _drop_reason(key)
        if reason is not None:
            dropped[key] = reason
            continue
        new_key = _hf_key(key)
        if new_key is None:
            unknown.append(key)
            continue
        converted[new_key] = _logit_scale(value) if key == "temperature" else value
        renamed[key] = new_key
    if unknown:
        shapes = "\n".join(
            f"  {key} {list(np.shape(state_dict[key]))}" for key in sorted(unknown)
        )
        raise CheckpointMismatchError(
            f"{len(unknown)} tensor(s) are not part of an original BridgeTower model "
            f"(BTTransformer with a CLIP ViT and a RoBERTa encoder):\n{shapes}\n"
            "Checkpoints of the original's METER, Swin or timm ViT variants, or of "
            "modified code, are not supported."
        )
    return converted, ConversionReport(renamed, dropped)


def _drop_reason(key: str) -> str | None:
    if key in _TEXT_BUFFERS:
        return "RoBERTa buffer, not a parameter"
    if any(
        key == name or (name.endswith(".") and key.startswith(name))
        for name in _CLIP_TEXT_TOWER
    ):
        return "CLIP text tower, unused by BridgeTower"
    return None


def _hf_key(key: str) -> str | None:
    if key in _EXACT_RENAMES:
        return _EXACT_RENAMES[key]
    for prefix, new_prefix in _PREFIX_RENAMES.items():
        if key.startswith(prefix):
            return new_prefix + key[len(prefix) :]
    module, _, rest = key.partition(".")
    if module in _SAME_NAME_MODULES and rest:
        return key
    return None


def _logit_scale(temperature: Any) -> np.ndarray:
    value = np.asarray(temperature)
    if value.size != 1 or not float(value.reshape(())) > 0:
        raise CheckpointMismatchError(
            f"temperature={value!r} must be one positive number; the original clamps "
            "it to [0.001, 0.5]. The checkpoint is damaged."
        )
    scale = math.log(1.0 / float(value.reshape(())))
    return np.asarray(scale, dtype=value.dtype).reshape(())


def head_from_loss_names(loss_names: Mapping[str, Any]) -> str:
    """Return the bt-jax head for the losses a run trained (weights above zero).

    Pretraining losses give "mlm", "itm", "itc" or a combination such as
    "mlm+itm"; the fine-tuning losses "vqa", "nlvr2" and "snli" give "vqa",
    "nlvr2" and "snli-ve". The retrieval recipes `itm_itc` and `irtr_itm_itc`
    train the ITM and ITC heads.
    """
    active = {name for name, weight in loss_names.items() if (weight or 0) > 0}
    heads = []
    if "mlm" in active:
        heads.append("mlm")
    if active & {"itm", "itm_itc", "irtr_itm_itc"}:
        heads.append("itm")
    if active & {"itc", "itm_itc", "irtr_itm_itc"}:
        heads.append("itc")
    tasks = [head for head, loss in _TASK_LOSSES.items() if loss in active]
    if len(tasks) > 1:
        raise ValueError(
            f"loss_names {dict(loss_names)} trains several fine-tuning heads "
            f"({', '.join(tasks)}), but a bt-jax model has one; choose it with --head."
        )
    if tasks:
        return tasks[0]
    return "+".join(heads) or "model"


def config_from_original(
    hparams: Mapping[str, Any], shapes: Mapping[str, Sequence[int]] | None = None
) -> BridgeTowerConfig:
    """Derive the bt-jax config from an original run's hyper-parameters.

    `hparams` is the Lightning `hyper_parameters` (`{"config": {...}}`) or the
    config dict itself. The backbones come from `vit` ("CLIP-ViT-B/16",
    "CLIP-ViT-L/14", ...) and `tokenizer` ("roberta-base", "roberta-large"):
    ViT-B/16 with roberta-base is BridgeTower base, ViT-L/14 with roberta-large
    is large. `shapes` (original key -> tensor shape) supply the sizes of other
    backbones, such as a CLIP file or RoBERTa folder given by path, and are
    checked against the named ones. The head follows `loss_names`
    (`head_from_loss_names`), and `architectures` names it.

    Raises:
      ValueError: a setting bt-jax cannot represent, a missing setting, or
        shapes that contradict the settings; the message names the value.
    """
    run = dict(hparams.get("config", hparams))
    shapes = {key: tuple(shape) for key, shape in (shapes or {}).items()}
    model_type = run.get("model_type", "BT")
    if model_type != "BT":
        raise ValueError(
            f"model_type={model_type!r}: only BridgeTower ('BT') checkpoints convert; "
            "the original repository's METER models have no bt-jax counterpart."
        )
    vision = _vision_settings(run, shapes)
    text = _text_settings(run, shapes)
    hidden = _required(run, "hidden_size")
    heads = _required(run, "num_heads")
    checks = {
        "hidden_size": (hidden, text["hidden_size"]),
        "num_heads": (heads, text["num_attention_heads"]),
        "hidden_size * mlp_ratio": (
            hidden * run.get("mlp_ratio", 4),
            text["intermediate_size"],
        ),
        "input_text_embed_size": (
            run.get("input_text_embed_size", text["hidden_size"]),
            text["hidden_size"],
        ),
        "input_image_embed_size": (
            run.get("input_image_embed_size", vision["hidden_size"]),
            vision["hidden_size"],
        ),
    }
    for name, (value, expected) in checks.items():
        if value != expected:
            raise ValueError(
                f"{name}={value} but the text encoder's value is {expected} (vision "
                "width for input_image_embed_size); bt-jax, like transformers, builds "
                "the cross-modal layers from the text encoder's sizes, so it cannot "
                "represent this model."
            )

    head = head_from_loss_names(run.get("loss_names") or {})
    data = {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": _required(run, "num_layers"),
        "init_layernorm_from_vision_encoder": bool(
            run.get("vit_layernorm_init_from_vit", False)
        ),
        "text_config": text,
        "vision_config": vision,
        "task_head_layers": run.get("task_head_layers", 2),
        "head_hidden_scale": float(run.get("head_hidden_scale", 1)),
        "num_token_types": 3 if head == "nlvr2" else 2,
    }
    if "itc" in head.split("+"):
        data["contrastive_hidden_size"] = run.get("contrastive_hidden_size", 256)
        data["logit_scale_init_value"] = math.log(1.0 / run.get("temperature", 0.07))
    if head == "nlvr2":
        data["head_dropout"] = float(run.get("nlvr2_drop_rate", 0.1))
    if head == "vqa":
        size = run.get("vqav2_label_size", 3129)
        data["id2label"] = {i: f"answer_{i}" for i in range(size)}
    elif head in TASK_LABELS:
        data["id2label"] = dict(enumerate(TASK_LABELS[head]))
    return BridgeTowerConfig.from_dict(data).with_head(head)


def _required(run: Mapping[str, Any], name: str) -> Any:
    if run.get(name) is None:
        raise ValueError(
            f"the checkpoint's hyper-parameters have no {name!r}; pass a config that "
            "describes the model instead (--config with a config.json or a preset "
            "such as configs/base.py)."
        )
    return run[name]


def _backbone_name(value: str) -> str:
    """Normalise "CLIP-ViT-B/16", "ViT-B-16.pt" or a path to one table key."""
    name = Path(value).name if value.endswith(".pt") else value
    name = name.lower().removeprefix("clip-").removesuffix(".pt").replace("/", "-")
    return re.sub(r"[@-]336px$", "", name)


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    return len({m.group(1) for key in shapes if (m := re.match(pattern, key))})


def _vision_settings(run: Mapping[str, Any], shapes: Mapping[str, tuple]) -> dict:
    vit = str(_required(run, "vit"))
    settings = dict(_VISION_BACKBONES.get(_backbone_name(vit), {}))
    remove_last = bool(run.get("vit_remove_last", False))

    # The stored weights give the sizes of any CLIP ViT, also one loaded by path.
    conv = shapes.get("vit_model.visual.conv1.weight")
    if conv is not None:
        blocks = _count(shapes, r"vit_model\.visual\.transformer\.resblocks\.(\d+)\.")
        stored = {
            "hidden_size": conv[0],
            "num_hidden_layers": blocks + (1 if remove_last else 0),
            "patch_size": conv[-1],
        }
        _check_backbone(f"vit={vit!r}", settings, stored)
        settings = stored
    elif not settings:
        raise ValueError(
            f"vit={vit!r} is not a CLIP backbone the original names (CLIP-ViT-B/16, "
            "CLIP-ViT-B/32, CLIP-ViT-L/14) and no weights give its sizes; pass "
            "--config."
        )

    image_size = _required(run, "image_size")
    patch = run.get("patch_size", settings["patch_size"])
    if patch != settings["patch_size"]:
        raise ValueError(
            f"patch_size={patch} but the {vit!r} backbone has {settings['patch_size']}-"
            "pixel patches; the hyper-parameters contradict the model."
        )

    # The original interpolates the table to image_size before training.
    positions = shapes.get("vit_model.visual.positional_embedding")
    expected = (image_size // patch) ** 2 + 1
    if positions is not None and positions[0] != expected:
        raise ValueError(
            f"the position table has {positions[0]} rows but image_size={image_size} "
            f"with {patch}-pixel patches needs {expected}; pass --config with the "
            "image size the checkpoint was trained at."
        )

    return {
        **settings,
        "image_size": image_size,
        "num_channels": conv[1] if conv is not None else 3,
        "share_layernorm": bool(run.get("vit_layernorm_shared", True)),
        "remove_last_layer": remove_last,
    }


def _text_settings(run: Mapping[str, Any], shapes: Mapping[str, tuple]) -> dict:
    tokenizer = str(_required(run, "tokenizer"))
    name = Path(tokenizer.rstrip("/")).name.lower()
    if "roberta" not in name:
        raise ValueError(
            f"tokenizer={tokenizer!r}: the original builds a BERT text encoder for "
            "it, but BridgeTower in bt-jax (as in transformers) has a RoBERTa encoder. "
            "Only RoBERTa-based checkpoints convert."
        )
    settings = dict(_TEXT_BACKBONES.get(name, {}))
    words = shapes.get("text_transformer.embeddings.word_embeddings.weight")
    if words is not None:
        layer = r"text_transformer\.encoder\.layer\.(\d+)\."
        ffn = "text_transformer.encoder.layer.0.intermediate.dense.weight"
        stored = {
            "hidden_size": words[1],
            "num_hidden_layers": _count(shapes, layer),
            # NOTE: shapes do not give the head count, so a RoBERTa loaded from
            # a path is assumed to have the cross-modal layers' num_heads.
            "num_attention_heads": settings.get(
                "num_attention_heads", _required(run, "num_heads")
            ),
            "intermediate_size": shapes[ffn][0] if ffn in shapes else None,
        }
        _check_backbone(f"tokenizer={tokenizer!r}", settings, stored)
        settings = stored
    elif not settings:
        raise ValueError(
            f"tokenizer={tokenizer!r} is not roberta-base or roberta-large and no "
            "weights give the encoder's sizes; pass --config."
        )
    positions = shapes.get("text_transformer.embeddings.position_embeddings.weight")
    types = shapes.get("text_transformer.embeddings.token_type_embeddings.weight")
    # RoBERTa's own settings: the original loads the encoder with from_pretrained.
    return {
        **settings,
        "vocab_size": words[0] if words is not None else run.get("vocab_size", 50265),
        "max_position_embeddings": positions[0] if positions is not None else 514,
        "type_vocab_size": types[0] if types is not None else 1,
        "hidden_dropout_prob": run.get("drop_rate", 0.1),
        "attention_probs_dropout_prob": run.get("drop_rate", 0.1),
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def _check_backbone(name: str, named: dict, stored: dict) -> None:
    wrong = [
        f"{key} {named[key]} (stored {stored[key]})"
        for key in named
        if stored.get(key) is not None and named[key] != stored[key]
    ]
    if wrong:
        raise ValueError(
            f"the weights do not match {name}: it has {', '.join(wrong)}. The "
            "hyper-parameters describe another model; pass --config."
        )


def prepare_conversion(
    checkpoint: OriginalCheckpoint,
    *,
    config: BridgeTowerConfig | None = None,
    head: str | None = None,
    answers: Sequence[str] | None = None,
    init_missing_heads: bool = False,
) -> OriginalConversion:
    """Rename a checkpoint's weights and settle the config and head to load them with.

    The config is `config` if given, else derived from the checkpoint's
    hyper-parameters (`config_from_original`). The head is `head` if given,
    else the one the run's `loss_names` trained, else the one the config's
    `architectures` names, else every pretraining head the checkpoint stores.
    Task-head sizes, token-type rows and ITC sizes are then read from the
    stored tensors. `answers` names the VQA classes, which are otherwise
    "answer_0", "answer_1", ... Messages name the `python -m convert to-jax`
    options that fix them.

    Raises:
      ValueError: no hyper-parameters and no `config`; an answer list whose
        length differs from the VQA head's outputs; an ITC head without
        `init_missing_heads` (original checkpoints lack the cross-modal ITC head).
      CheckpointMismatchError: unknown keys or `rank_output`; a task head that
        the chosen head does not declare; a token-type table or classifier
        whose size does not fit the head.
    """
    state, report = original_to_hf_state_dict(checkpoint.state_dict)
    run = checkpoint.run_config
    if config is None:
        if run is None:
            raise ValueError(
                f"{checkpoint.path} has no hyper-parameters to derive the model config "
                "from; pass --config with a config.json or a preset such as "
                "configs/base.py (configs/large.py for ViT-L/14 and roberta-large)."
            )
        shapes = {key: value.shape for key, value in checkpoint.state_dict.items()}
        config = config_from_original(run, shapes)
    head, declared_by = _choose_head(head, run, config, state)
    _check_task_heads(checkpoint.path, head, declared_by, state)
    config = _fit_token_types(config, head, state)
    config = _fit_itc(config, head, state, init_missing_heads, checkpoint.path)
    if "itc" not in head.split("+") and "logit_scale" in state:
        del state["logit_scale"]
        del report.renamed["temperature"]
        report.dropped["temperature"] = f"used by ITC only, and head {head!r} has none"
    if head in TASK_HEADS:
        config = _fit_task_head(config, head, state, answers)
    elif answers is not None:
        raise ValueError(
            f"--answers names the classes of the VQA head, but the head is {head!r}."
        )
    logger.info("Converting to the %s head (chosen by %s)", head, declared_by)
    return OriginalConversion(config.with_head(head), head, state, report)


def _stored(state: Mapping[str, Any], module: str) -> bool:
    return any(key.startswith(module + ".") for key in state)


def _choose_head(head, run, config, state) -> tuple[str, str]:
    """Return the head and what chose it, by the order in `prepare_conversion`."""
    if head is not None:
        return head, f"--head {head}"
    if run is not None and run.get("loss_names"):
        active = {k: v for k, v in run["loss_names"].items() if (v or 0) > 0}
        return head_from_loss_names(run["loss_names"]), f"its loss_names {active}"
    if config.default_head != "model":
        return config.default_head, "the config's architectures"
    modules = {"mlm": "mlm_score", "itm": "itm_score", "itc": "itc_text_head"}
    stored = [name for name, module in modules.items() if _stored(state, module)]
    return "+".join(stored) or "model", "the heads it stores"


def _check_task_heads(path: Path, head: str, declared_by: str, state) -> None:
    stored = [
        name for name, module in TASK_HEAD_MODULES.items() if _stored(state, module)
    ]
    undeclared = [name for name in stored if name != head]
    if not undeclared:
        return
    modules = ", ".join(f"{TASK_HEAD_MODULES[name]}.*" for name in undeclared)
    if len(stored) == 1:
        fix = f"pass --head {stored[0]} to convert it"
    else:
        fix = "a bt-jax model has one fine-tuning head, so it cannot be converted"
    raise CheckpointMismatchError(
        f"{path} contains the {' and '.join(undeclared)} head ({modules}), which "
        f"{declared_by} does not declare (head {head!r}); {fix}."
    )


def _fit_token_types(config: BridgeTowerConfig, head: str, state) -> BridgeTowerConfig:
    rows = 3 if head == "nlvr2" else 2
    table = state.get("token_type_embeddings.weight")
    if table is not None and table.shape[0] != rows:
        raise CheckpointMismatchError(
            f"token_type_embeddings.weight has {table.shape[0]} rows but the {head} "
            f"head uses {rows}: NLVR2 checkpoints have 3 (the second image is type 2), "
            "all others 2. Pass --head nlvr2 for an NLVR2 checkpoint."
        )
    return config.replace(num_token_types=rows)


def _fit_itc(config, head, state, init_missing_heads, path) -> BridgeTowerConfig:
    heads = head.split("+")
    if "itc" not in heads:
        if _stored(state, "itc_text_head"):
            logger.info("Leaving out the ITC heads: head %r has none", head)
        return config
    if not _stored(state, "itc_cross_modal_head") and not init_missing_heads:
        others = "+".join(name for name in heads if name != "itc") or "model"
        raise ValueError(
            f"head {head!r} includes ITC, but {path} has no itc_cross_modal_head: "
            "the original trains only the text and image ITC heads, while bt-jax's "
            "ITC head (transformers' BridgeTowerForContrastiveLearning) also has a "
            "cross-modal one, and applies the image head to other features than the "
            "original. Pass --init-missing-heads to start the cross-modal head from "
            f"random weights for fine-tuning, or --head {others} to leave ITC out."
        )
    changes = {}
    text_head = state.get("itc_text_head.fc.weight")
    if text_head is not None:
        changes["contrastive_hidden_size"] = int(text_head.shape[0])
    elif config.contrastive_hidden_size is None:
        raise ValueError(
            f"head {head!r} includes ITC, but neither {path} nor the config gives the "
            "ITC embedding size; pass --config with contrastive_hidden_size."
        )
    if config.logit_scale_init_value is None:
        # The original's default initial temperature is 0.07.
        changes["logit_scale_init_value"] = math.log(1.0 / 0.07)
    return config.replace(**changes)


def _fit_task_head(config, head, state, answers) -> BridgeTowerConfig:
    """Read a task classifier's layer count, width and outputs from its tensors."""
    module = TASK_HEAD_MODULES[head]
    first = state.get(f"{module}.0.weight")
    last = state.get(f"{module}.3.weight")
    changes: dict[str, Any] = {}
    outputs = None
    if first is not None:
        changes["task_head_layers"] = 2 if last is not None else 1
        outputs = int((first if last is None else last).shape[0])
    if first is not None and last is not None:
        width = int(first.shape[0])
        scale = width / (2 * config.hidden_size)
        if int(2 * config.hidden_size * scale) != width:
            scale = math.nextafter(scale, math.inf)
        changes["head_hidden_scale"] = scale
    changes["id2label"] = _task_labels(config, head, outputs, answers)
    return config.replace(**changes)


def _task_labels(config, head, outputs, answers) -> dict[int, str]:
    module = TASK_HEAD_MODULES[head]
    current = config.id2label
    if head != "vqa":
        if answers is not None:
            raise ValueError(
                f"--answers names the VQA head's classes; the {head} head's classes "
                f"are fixed: {', '.join(TASK_LABELS[head])}."
            )
        names = TASK_LABELS[head]
        if outputs is not None and outputs != len(names):
            raise CheckpointMismatchError(
                f"{module} has {outputs} outputs, but the {head} head has "
                f"{len(names)} classes ({', '.join(names)})."
            )
        return (
            current
            if current and len(current) == len(names)
            else dict(enumerate(names))
        )
    if answers is not None:
        if outputs is not None and len(answers) != outputs:
            raise ValueError(
                f"the answer list has {len(answers)} answers but {module} has "
                f"{outputs} outputs; pass the list the model was trained with, in "
                "label order."
            )
        return dict(enumerate(answers))
    if current and outputs is not None and len(current) != outputs:
        raise ValueError(
            f"the config (or the hyper-parameters' vqav2_label_size) gives "
            f"{len(current)} answers but {module} has {outputs} outputs; pass "
            "--answers with the checkpoint's answer list."
        )
    if not current and outputs is None:
        raise ValueError(
            "the number of VQA answers is unknown: the checkpoint has no "
            f"{module} and the config no id2label; pass --answers."
        )
    labels = current or {i: f"answer_{i}" for i in range(outputs)}
    if all(label == f"answer_{i}" for i, label in labels.items()):
        logger.warning(
            "No answer list given: the %d VQA classes are named answer_0 to "
            "answer_%d. Pass --answers to name them.",
            len(labels),
            len(labels) - 1,
        )
    return labels


def read_answers(path: str | os.PathLike) -> list[str]:
    """Read a VQA answer list in label order (`bt_jax.data.vqa.read_answer_list`).

    Accepts a JSON list, a model's `config.json`, a VQA dataset's
    `metadata.json`, an object with a "label2ans" list or an answer -> label
    mapping, or a folder with one of these files.
    """
    from bt_jax.data.vqa import read_answer_list

    return read_answer_list(path)
