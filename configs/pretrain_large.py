"""Training config: pretrain BridgeTower large with MLM, ITM and ITC.

Run it with

    python -m train --config configs/pretrain_large.py --workdir runs/large \
        --config.data.dataset=PATH --config.tokenizer=DIR

The recipe of `configs/pretrain_base.py` (the reference uses the same
hyper-parameters for both sizes) on the large model: CLIP ViT-L/14 at 294 px,
RoBERTa-large, 6 cross-modal layers of width 1024. Parameters and optimizer
state are sharded over every device, the attention heads and MLP split two
ways over a tensor axis, and each step runs in 4 microbatches. See
pretrain_base.py for the fields people change, and check the bytes per device
with `python -m train.memory --config configs/pretrain_large.py` first: the
README's table estimates 32.7 GiB per device at 32 examples per batch shard
per microbatch.
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the large pretraining run's config."""
    spec = importlib.util.spec_from_file_location(
        "pretrain_base", Path(__file__).with_name("pretrain_base.py")
    )
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    config = base.get_config()
    config.model = str(Path(__file__).with_name("large.py"))
    config.accumulation_steps = 4
    config.mesh_shape = (1, -1, 2)
    return config
