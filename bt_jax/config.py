"""Typed BridgeTower configuration that reads and writes Hugging Face `config.json`.

The field names and defaults are those of `transformers.BridgeTowerConfig` (and its
text and vision sub-configs), so a directory converted by bt-jax stays loadable by
`transformers`. Keys that bt-jax does not use are kept in `extra` and written back
unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

MODEL_TYPE = "bridgetower"
TEXT_MODEL_TYPE = "bridgetower_text_model"
VISION_MODEL_TYPE = "bridgetower_vision_model"

LINK_TOWER_TYPES = ("add", "scaled_add", "interpolate")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")

# Head names accepted by `from_pretrained(head=...)`, and the Hugging Face class
# name that `config.json`'s `architectures` uses for each.
HEAD_ARCHITECTURES = {
    "model": "BridgeTowerModel",
    "mlm": "BridgeTowerForMaskedLM",
    "itm": "BridgeTowerForImageAndTextRetrieval",
    "itc": "BridgeTowerForContrastiveLearning",
    # Fine-tuning heads of the original repository; transformers has no class
    # for them, so these names are bt-jax's own.
    "vqa": "BridgeTowerForVisualQuestionAnswering",
    "nlvr2": "BridgeTowerForNLVR2",
    "snli-ve": "BridgeTowerForVisualEntailment",
}
# Heads that classify a pooled pair into `id2label`'s classes.
TASK_HEADS = ("vqa", "nlvr2", "snli-ve")
TASK_HEAD_OUTPUTS = {"nlvr2": 2, "snli-ve": 3}

# Key names used by pre-release hub configs, mapped to the names transformers
# uses now. A legacy key is only read when the current key is absent.
_LEGACY_TOP_LEVEL_KEYS = {
    "link_tower_shared": "share_link_tower_layers",
    "cross_modal_transform_shared": "share_cross_modal_transformer_layers",
    "vit_layernorm_init_from_vit": "init_layernorm_from_vision_encoder",
}
_LEGACY_VISION_KEYS = {
    "vit_layernorm_shared": "share_layernorm",
    "vit_remove_last": "remove_last_layer",
}


def _as_square_size(value: Any, name: str) -> int:
    """Return `value` as one int; transformers allows an `[n, n]` pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"vision_config.{name}={list(value)} is not square; BridgeTower "
                f"supports only square {name}s, so set it to one integer."
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"vision_config.{name}={value!r} must be a positive integer.")
    return value


_TYPE_CHECKS = {
    "int": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "float": lambda value: (
        isinstance(value, (int, float)) and not isinstance(value, bool)
    ),
    "bool": lambda value: isinstance(value, bool),
    "str": lambda value: isinstance(value, str),
}


def _check_field_types(config: Any, where: str) -> None:
    """Raise ValueError for a field whose JSON value has the wrong type.

    Without this, a string such as "false" would pass for a true flag.
    """
    for field in dataclasses.fields(config):
        expected = str(field.type)
        value = getattr(config, field.name)
        if value is None and expected.endswith("| None"):
            continue
        check = _TYPE_CHECKS.get(expected.removesuffix(" | None"))
        if check is not None and not check(value):
            raise ValueError(
                f"{where}.{field.name}={value!r} is a {type(value).__name__}, but it must "
                f"be a JSON {expected.removesuffix(' | None')}."
            )


def _label_table(value: Any) -> dict[int, str]:
    """Return `id2label` with int keys 0..n-1; JSON gives string keys."""
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"id2label={value!r} must be a non-empty mapping from class index to "
            'label, such as {"0": "no", "1": "yes"}.'
        )
    try:
        table = {int(index): str(label) for index, label in value.items()}
    except (TypeError, ValueError):
        raise ValueError(
            f"id2label has a key that is not an integer: {sorted(value)[:5]!r}; "
            "use class indices 0..n-1 as keys."
        ) from None
    if sorted(table) != list(range(len(table))):
        raise ValueError(
            f"id2label keys must be 0..{len(table) - 1} without gaps; got "
            f"{sorted(table)[:10]!r}."
        )
    return dict(sorted(table.items()))


def _check_positive(where: str, **sizes: Any) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name}={value!r} must be a positive integer.")


def _split_known(cls: type, data: Mapping[str, Any]) -> tuple[dict, dict]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


def _apply_legacy_keys(data: dict, aliases: Mapping[str, str], where: str) -> None:
    for old, new in aliases.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new in data:
            if data[new] != value:
                logger.warning(
                    "%s has both %r=%r and the legacy key %r=%r; using %r.",
                    where,
                    new,
                    data[new],
                    old,
                    value,
                    new,
                )
        else:
            data[new] = value


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Settings of the CLIP ViT image encoder (`vision_config` in `config.json`)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_channels: int = 3
    patch_size: int = 16
    image_size: int = 288
    initializer_factor: float = 1.0
    layer_norm_eps: float = 1e-5
    stop_gradient: bool = False
    share_layernorm: bool = True
    remove_last_layer: bool = False
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(
            self, "patch_size", _as_square_size(self.patch_size, "patch_size")
        )
        object.__setattr__(
            self, "image_size", _as_square_size(self.image_size, "image_size")
        )
        _check_field_types(self, "vision_config")
        _check_positive(
            "vision_config",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_channels=self.num_channels,
        )
        # CLIP fixes the head width at 64, so the head count follows from the width.
        if self.hidden_size < 64 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size={self.hidden_size} is invalid: the CLIP "
                "encoder uses hidden_size // 64 attention heads, so the width must be "
                "at least 64 and divisible by that head count (for example 64, 128, 768)."
            )
        if self.num_hidden_layers < 1:
            raise ValueError(
                f"vision_config.num_hidden_layers={self.num_hidden_layers} must be at least 1."
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"vision_config.image_size={self.image_size} is smaller than "
                f"patch_size={self.patch_size}; the image would have no patches."
            )

    @property
    def num_attention_heads(self) -> int:
        return max(self.hidden_size // 64, 1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def grid_size(self) -> int:
        """Patches per side at `image_size` (the conv drops trailing pixels)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the position table: one per patch plus the class token."""
        return self.grid_size**2 + 1

    @property
    def num_blocks(self) -> int:
        """Residual blocks actually built; `remove_last_layer` drops the top one."""
        return (
            self.num_hidden_layers - 1
            if self.remove_last_layer
            else self.num_hidden_layers
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisionConfig:
        data = dict(data)
        _apply_legacy_keys(data, _LEGACY_VISION_KEYS, "vision_config")
        data.pop("model_type", None)
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        del out["extra"]
        out["model_type"] = VISION_MODEL_TYPE
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Settings of the RoBERTa text encoder (`text_config` in `config.json`)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    initializer_factor: float = 1.0
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if isinstance(self.pad_token_id, bool) or not isinstance(
            self.pad_token_id, int
        ):
            raise ValueError(
                f"text_config.pad_token_id={self.pad_token_id!r} must be an integer: "
                "RoBERTa position ids are counted from it (1 in released checkpoints)."
            )
        _check_field_types(self, "text_config")
        _check_positive(
            "text_config",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            type_vocab_size=self.type_vocab_size,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size={self.hidden_size} is not divisible by "
                f"text_config.num_attention_heads={self.num_attention_heads}; choose a "
                "head count that divides the hidden size."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"text_config.hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{', '.join(ACTIVATIONS)}."
            )
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(
                f"text_config.max_position_embeddings={self.max_position_embeddings} "
                f"leaves no positions after the padding offset pad_token_id + 1 = "
                f"{self.pad_token_id + 1}."
            )
        if self.num_hidden_layers < 1:
            raise ValueError(
                f"text_config.num_hidden_layers={self.num_hidden_layers} must be at least 1."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_text_length(self) -> int:
        """Maximum input length in tokens that the position table allows.

        RoBERTa numbers real tokens from `pad_token_id + 1`, so a sequence of length
        T needs position `T + pad_token_id`, which must be a row of the table.
        """
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextConfig:
        data = dict(data)
        data.pop("model_type", None)
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        del out["extra"]
        out["model_type"] = TEXT_MODEL_TYPE
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class BridgeTowerConfig:
    """Settings of the whole model: both encoders, the bridges and the heads.

    `num_hidden_layers` is the number of cross-modal layers per stream. The top
    `num_hidden_layers` layers of each uni-modal encoder feed them through the
    bridges. The cross-modal layers take their width, head count, FFN size and
    activation from `text_config`, as in the reference implementation, so the
    top-level `num_attention_heads` is unused and not validated.
    `vision_config.stop_gradient` only affects the reference's stand-alone vision
    model and is unused here too.
    """

    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    share_cross_modal_transformer_layers: bool = True
    hidden_act: str = "gelu"
    hidden_size: int = 768
    initializer_factor: float = 1.0
    layer_norm_eps: float = 1e-5
    share_link_tower_layers: bool = False
    link_tower_type: str = "add"
    num_attention_heads: int = 12
    num_hidden_layers: int = 6
    tie_word_embeddings: bool = False
    init_layernorm_from_vision_encoder: bool = False
    contrastive_hidden_size: int | None = None
    logit_scale_init_value: float | None = None
    architectures: tuple[str, ...] | None = None
    # Fine-tuning heads (VQA, NLVR2, SNLI-VE); see `bt_jax.modeling.tasks`.
    id2label: dict[int, str] | None = None
    task_head_layers: int = 2
    head_hidden_scale: float = 2.0
    head_dropout: float = 0.0
    num_token_types: int = 2
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.architectures is not None:
            object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.id2label is not None:
            table = _label_table(self.id2label)
            # transformers writes {0: "LABEL_0", 1: "LABEL_1"} into every
            # config.json; those placeholders declare no classes.
            if table == {0: "LABEL_0", 1: "LABEL_1"}:
                table = None
            object.__setattr__(self, "id2label", table)
        _check_field_types(self, "config")
        if self.task_head_layers not in (1, 2):
            raise ValueError(
                f"task_head_layers={self.task_head_layers} is not supported; use 1 "
                "(one linear layer) or 2 (linear, LayerNorm, GELU, linear)."
            )
        if self.head_hidden_scale <= 0:
            raise ValueError(
                f"head_hidden_scale={self.head_hidden_scale} must be positive "
                "(2 for VQA and SNLI-VE, 1.5 for NLVR2 in the reference recipes)."
            )
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout={self.head_dropout} must be in [0, 1).")
        if self.num_token_types not in (2, 3):
            raise ValueError(
                f"num_token_types={self.num_token_types} is not supported; use 2 "
                "(text and image), or 3 for NLVR2's second image."
            )
        text, vision = self.text_config, self.vision_config
        if self.link_tower_type not in LINK_TOWER_TYPES:
            raise ValueError(
                f"link_tower_type={self.link_tower_type!r} is not supported; use one of "
                f"{', '.join(LINK_TOWER_TYPES)}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{', '.join(ACTIVATIONS)}."
            )
        if self.hidden_size != text.hidden_size:
            raise ValueError(
                f"hidden_size={self.hidden_size} differs from text_config.hidden_size="
                f"{text.hidden_size}; the cross-modal layers are built from the text "
                "settings, so both must be equal."
            )
        if vision.num_hidden_layers != text.num_hidden_layers:
            raise ValueError(
                f"vision_config.num_hidden_layers={vision.num_hidden_layers} differs from "
                f"text_config.num_hidden_layers={text.num_hidden_layers}; BridgeTower "
                "pairs the layers of both encoders, so give them the same depth."
            )
        if not 1 <= self.num_hidden_layers <= text.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers={self.num_hidden_layers} cross-modal layers need as "
                f"many text layers to bridge, but text_config.num_hidden_layers="
                f"{text.num_hidden_layers}; use between 1 and {text.num_hidden_layers}."
            )
        if self.num_hidden_layers > vision.num_blocks:
            raise ValueError(
                f"num_hidden_layers={self.num_hidden_layers} cross-modal layers need as "
                f"many vision blocks to bridge, but only {vision.num_blocks} are built "
                "(remove_last_layer drops one); lower num_hidden_layers."
            )
        if (
            self.contrastive_hidden_size is not None
            and self.contrastive_hidden_size < 1
        ):
            raise ValueError(
                f"contrastive_hidden_size={self.contrastive_hidden_size} must be positive."
            )

    @property
    def num_labels(self) -> int | None:
        """Classes of a fine-tuning head: the length of `id2label`, or None."""
        return None if self.id2label is None else len(self.id2label)

    @property
    def num_link_towers(self) -> int:
        """Link towers per stream: one for every cross-modal layer after the first."""
        return self.num_hidden_layers - 1

    @property
    def text_split_index(self) -> int:
        """Text layers run before the first cross-modal layer (7 for base)."""
        return self.text_config.num_hidden_layers - self.num_hidden_layers + 1

    @property
    def vision_split_index(self) -> int:
        """Vision blocks run before the first cross-modal layer."""
        return self.vision_config.num_blocks - self.num_hidden_layers + 1

    @property
    def num_transforms(self) -> int:
        """Cross-modal transforms per stream: one shared, or one per bridge level."""
        return (
            1 if self.share_cross_modal_transformer_layers else self.num_hidden_layers
        )

    @property
    def default_head(self) -> str:
        """Head named by `architectures`, or "model" when it names none."""
        for arch in self.architectures or ():
            for head, name in HEAD_ARCHITECTURES.items():
                if arch == name:
                    return head
        return "model"

    def replace(self, **changes: Any) -> BridgeTowerConfig:
        """Return a copy with `changes` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BridgeTowerConfig:
        """Build a config from a `config.json` dict, tolerating legacy keys."""
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config model_type is {model_type!r}, not {MODEL_TYPE!r}: this is not a "
                "BridgeTower checkpoint. Point to a directory whose config.json has "
                f'"model_type": "{MODEL_TYPE}".'
            )

        # Early hub configs stored the sub-configs under *_config_dict; transformers
        # drops those keys when the current names are present.
        for name in ("text_config", "vision_config"):
            legacy = data.pop(f"{name}_dict", None)
            if data.get(name) is None and legacy is not None:
                data[name] = legacy
        _apply_legacy_keys(data, _LEGACY_TOP_LEVEL_KEYS, "config")

        # Sub-configs may arrive as dicts or as already-built config objects.
        text = data.pop("text_config", None) or {}
        if isinstance(text, TextConfig):
            text = text.to_dict()
        vision = data.pop("vision_config", None) or {}
        vision = vision.to_dict() if isinstance(vision, VisionConfig) else dict(vision)
        # Pre-release configs also kept vision flags at the top level.
        for old in _LEGACY_VISION_KEYS:
            if old in data:
                vision[old] = data.pop(old)

        known, extra = _split_known(cls, data)
        return cls(
            text_config=TextConfig.from_dict(text),
            vision_config=VisionConfig.from_dict(vision),
            **known,
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the `config.json` dict, with unknown keys passed through."""
        out = dict(self.extra)
        for field in dataclasses.fields(self):
            if field.name in ("extra", "text_config", "vision_config"):
                continue
            value = getattr(self, field.name)
            if field.name in (
                "contrastive_hidden_size",
                "logit_scale_init_value",
                "architectures",
                "id2label",
            ):
                if value is None:
                    continue
                if field.name == "architectures":
                    value = list(value)
                if field.name == "id2label":
                    # JSON object keys are strings, as transformers writes them.
                    value = {str(index): label for index, label in value.items()}
            out[field.name] = value
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["model_type"] = MODEL_TYPE
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BridgeTowerConfig:
        """Read a `config.json` file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"config file not found: {path}. A BridgeTower checkpoint directory "
                "needs a config.json next to its weights."
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); repair or re-export it."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must contain a JSON object, not {type(data).__name__}."
            )
        return cls.from_dict(data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `config.json` in the Hugging Face schema."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def with_head(self, head: str) -> BridgeTowerConfig:
        """Return a copy whose `architectures` names the class for `head`.

        A multi-head name such as "mlm+itm+itc" has no transformers class, so it
        gets the class of its last head (ITC, else ITM). The hub's
        bridgetower-large-itm-mlm-itc checkpoint stores all three heads and names
        the ITC class in the same way.
        """
        if "+" in head:
            head = head.rsplit("+", 1)[1]
        if head not in HEAD_ARCHITECTURES:
            raise ValueError(
                f"head={head!r} is unknown; use one of {', '.join(HEAD_ARCHITECTURES)} "
                "or a combination such as 'mlm+itm+itc'."
            )
        return self.replace(architectures=(HEAD_ARCHITECTURES[head],))


def load_preset(path: str | os.PathLike) -> BridgeTowerConfig:
    """Load a model preset file (such as `configs/base.py`) whose `get_config()`
    returns a `config.json`-shaped dict or ConfigDict."""
    import importlib.util

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"preset file not found: {path}. Presets ship in the repository's "
            "configs/ folder (tiny.py, base.py, large.py)."
        )
    spec = importlib.util.spec_from_file_location("_bt_jax_preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config() function.")
    data = module.get_config()
    if hasattr(data, "to_dict"):
        data = data.to_dict()
    return BridgeTowerConfig.from_dict(data)
