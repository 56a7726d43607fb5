"""Model preset: a tiny BridgeTower for tests and quick experiments.

Every part of the real architecture at a few thousand parameters: 3 text layers
and 3 vision blocks of width 64, 2 cross-modal layers, 32x32 images with 16-pixel
patches. The vision width must be at least 64 because CLIP uses width // 64
attention heads. Tests derive their variants from this preset.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the preset as a `config.json`-shaped ConfigDict."""
    return ml_collections.ConfigDict(
        {
            "model_type": "bridgetower",
            "hidden_size": 64,
            "hidden_act": "gelu",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "layer_norm_eps": 1e-5,
            "initializer_factor": 1,
            "link_tower_type": "add",
            "share_cross_modal_transformer_layers": True,
            "share_link_tower_layers": False,
            "init_layernorm_from_vision_encoder": False,
            "tie_word_embeddings": False,
            "contrastive_hidden_size": 16,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "vocab_size": 99,
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
                "max_position_embeddings": 64,
                "type_vocab_size": 1,
                "layer_norm_eps": 1e-5,
                "pad_token_id": 1,
                "bos_token_id": 0,
                "eos_token_id": 2,
            },
            "vision_config": {
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_channels": 3,
                "patch_size": 16,
                "image_size": 32,
                "layer_norm_eps": 1e-5,
                "share_layernorm": True,
                "remove_last_layer": False,
                "stop_gradient": False,
            },
        }
    )
