"""Model preset: BridgeTower base (`bridgetower-base`, `bridgetower-base-itm-mlm`).

CLIP ViT-B/16 at 288 px and RoBERTa-base, bridged into 6 cross-modal layers.
The values are those of the released checkpoints' `config.json` (the
transformers defaults). Load it with `bt_jax.config.load_preset("configs/base.py")`
or `python -m convert init-random --config configs/base.py OUT`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the preset as a `config.json`-shaped ConfigDict."""
    return ml_collections.ConfigDict(
        {
            "model_type": "bridgetower",
            "hidden_size": 768,
            "hidden_act": "gelu",
            "num_attention_heads": 12,
            "num_hidden_layers": 6,
            "layer_norm_eps": 1e-5,
            "initializer_factor": 1,
            "link_tower_type": "add",
            "share_cross_modal_transformer_layers": True,
            "share_link_tower_layers": False,
            "init_layernorm_from_vision_encoder": False,
            "tie_word_embeddings": False,
            "text_config": {
                "vocab_size": 50265,
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
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
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_channels": 3,
                "patch_size": 16,
                "image_size": 288,
                "layer_norm_eps": 1e-5,
                "share_layernorm": True,
                "remove_last_layer": False,
                "stop_gradient": False,
            },
        }
    )
