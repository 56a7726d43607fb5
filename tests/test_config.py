"""BridgeTowerConfig: reading and writing config.json, legacy keys, presets, validation."""

import json

import pytest
import transformers
from helpers import REPO, tiny_config

from bt_jax.config import BridgeTowerConfig, load_preset


def test_config_matches_transformers_defaults():
    reference = transformers.BridgeTowerConfig()
    config = BridgeTowerConfig.from_dict(reference.to_dict())

    assert config.hidden_size == reference.hidden_size
    assert config.num_hidden_layers == reference.num_hidden_layers
    assert config.text_config.vocab_size == reference.text_config.vocab_size
    assert config.text_config.max_position_embeddings == 514
    assert config.vision_config.image_size == reference.vision_config.image_size
    assert config.vision_config.patch_size == reference.vision_config.patch_size
    assert config.link_tower_type == reference.link_tower_type


def test_config_round_trips_through_transformers(tmp_path):
    config = BridgeTowerConfig.from_dict(
        tiny_config(link_tower_type="scaled_add", share_link_tower_layers=True)
    )
    config.with_head("itc").to_json_file(tmp_path / "config.json")
    reference = transformers.BridgeTowerConfig.from_pretrained(tmp_path)
    again = BridgeTowerConfig.from_dict(reference.to_dict())

    assert again == config.with_head("itc")
    assert reference.architectures == ["BridgeTowerForContrastiveLearning"]
    assert reference.contrastive_hidden_size == 16
    assert reference.vision_config.hidden_size == 64


def test_config_keeps_unknown_keys(tmp_path):
    data = tiny_config()
    data["drop_rate"] = 0.1
    data["head_hidden_scale"] = 2
    data["text_config"]["position_embedding_type"] = "absolute"
    BridgeTowerConfig.from_dict(data).to_json_file(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())

    assert written["drop_rate"] == 0.1
    assert written["head_hidden_scale"] == 2
    assert written["text_config"]["position_embedding_type"] == "absolute"


def test_config_reads_legacy_sub_config_keys():
    data = tiny_config()
    data["text_config_dict"] = data.pop("text_config")
    data["vision_config_dict"] = data.pop("vision_config")
    config = BridgeTowerConfig.from_dict(data)

    assert config.text_config.vocab_size == 99
    assert config.vision_config.image_size == 32
    assert "text_config_dict" not in config.to_dict()


def test_config_reads_pre_release_flag_names():
    data = tiny_config()
    del data["share_link_tower_layers"], data["share_cross_modal_transformer_layers"]
    del data["vision_config"]["share_layernorm"]
    data["link_tower_shared"] = True
    data["cross_modal_transform_shared"] = False
    data["vit_layernorm_shared"] = False
    config = BridgeTowerConfig.from_dict(data)

    assert config.share_link_tower_layers is True
    assert config.share_cross_modal_transformer_layers is False
    assert config.vision_config.share_layernorm is False


def test_config_current_key_wins_over_legacy():
    data = tiny_config(share_link_tower_layers=False)
    data["link_tower_shared"] = True

    assert BridgeTowerConfig.from_dict(data).share_link_tower_layers is False


def test_config_accepts_square_size_pairs():
    config = BridgeTowerConfig.from_dict(
        tiny_config(vision_config={"patch_size": [16, 16], "image_size": [32, 32]})
    )

    assert config.vision_config.patch_size == 16
    assert config.vision_config.image_size == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_config": {"num_attention_heads": 5}}, "not divisible"),
        ({"vision_config": {"num_hidden_layers": 4}}, "same depth"),
        ({"num_hidden_layers": 4}, "cross-modal layers need"),
        ({"link_tower_type": "concat"}, "link_tower_type='concat'"),
        ({"hidden_size": 128}, "differs from text_config.hidden_size"),
        ({"vision_config": {"hidden_size": 32}}, "at least 64"),
        ({"vision_config": {"patch_size": [16, 8]}}, "not square"),
        ({"text_config": {"hidden_act": "swish2"}}, "hidden_act='swish2'"),
        (
            {"vision_config": {"remove_last_layer": True}, "num_hidden_layers": 3},
            "remove_last_layer",
        ),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        BridgeTowerConfig.from_dict(tiny_config(**overrides))


def test_config_rejects_other_model_type():
    with pytest.raises(ValueError, match="'clip', not 'bridgetower'"):
        BridgeTowerConfig.from_dict({"model_type": "clip"})


def test_default_head_follows_architectures():
    data = tiny_config()
    data["architectures"] = ["BridgeTowerForMaskedLM"]

    assert BridgeTowerConfig.from_dict(data).default_head == "mlm"
    assert BridgeTowerConfig.from_dict(tiny_config()).default_head == "model"


def test_base_preset_equals_transformers_defaults():
    preset = load_preset(REPO / "configs" / "base.py")

    assert preset == BridgeTowerConfig.from_dict(
        transformers.BridgeTowerConfig().to_dict()
    )
    assert preset.text_split_index == 7
    assert preset.vision_config.num_positions == 325


def test_large_preset_has_checkpoint_values():
    preset = load_preset(REPO / "configs" / "large.py")

    assert preset.hidden_size == 1024
    assert preset.text_config.num_hidden_layers == 24
    assert preset.text_config.num_attention_heads == 16
    assert preset.text_config.intermediate_size == 4096
    assert preset.vision_config.patch_size == 14
    assert preset.vision_config.image_size == 294
    assert preset.vision_config.num_positions == 442
    assert preset.vision_config.num_attention_heads == 16
    assert preset.text_split_index == 19
    assert preset.contrastive_hidden_size == 512
    assert preset.logit_scale_init_value == pytest.approx(2.6592)


def test_load_preset_missing_file():
    with pytest.raises(FileNotFoundError, match="preset file not found"):
        load_preset(REPO / "configs" / "huge.py")


def test_config_accepts_built_sub_configs():
    config = BridgeTowerConfig.from_dict(tiny_config())
    data = config.to_dict()
    data["text_config"] = config.text_config
    data["vision_config"] = config.vision_config

    assert BridgeTowerConfig.from_dict(data) == config
