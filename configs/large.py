"""Model preset: BridgeTower large (`bridgetower-large-itm-mlm-itc` and its siblings).

CLIP ViT-L/14 at 294 px and RoBERTa-large, bridged into 6 cross-modal layers of
width 1024. The values are those of the released ITC checkpoint's `config.json`,
including its contrastive head (512-dimensional, logit scale ln(1/0.07) = 2.6592).
Load it with `bt_jax.config.load_preset("configs/large.py")`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the preset as a `config.json`-shaped ConfigDict."""
    return ml_collections.ConfigDict(
        {
            "model_type": "bridgetower",
            "hidden_size": 1024,
            "hidden_act": "gelu",
            "num_attention_heads": 16,
            "num_hidden_layers": 6,
            "layer_norm_eps": 1e-5,
            "initializer_factor": 1,
            "link_tower_type": "add",
            "share_cross_modal_transformer_layers": True,
            "share_link_tower_layers": False,
            "init_layernorm_from_vision_encoder": False,
            "tie_word_embeddings": False,
            "contrastive_hidden_size": 512,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "vocab_size": 50265,
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "intermediate_size": 4096,
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1,
                "max_position_embeddings": 514,
                "type_vocab_size": 1,
                "layer_norm_eps": 1e-5,
                "pad_token_id": 1,
                "bos_token_id": 0,
                "eos_token_id": 2,
            },
            "vision_config": {
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_channels": 3,
                "patch_size": 14,
                "image_size": 294,
                "layer_norm_eps": 1e-5,
                "share_layernorm": True,
                "remove_last_layer": False,
                "stop_gradient": False,
            },
        }
    )
