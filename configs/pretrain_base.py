"""Training config: pretrain BridgeTower base with MLM, ITM and ITC.

Run it with

    python -m train --config configs/pretrain_base.py --workdir runs/base \
        --config.data.dataset=PATH --config.tokenizer=DIR

The hyper-parameters are the reference base pretraining recipe: 288 px images,
text length 50, AdamW at 1e-5 with betas (0.9, 0.98), 10% warmup then linear
decay, weight decay 0.01, learning-rate multipliers of 5 for the cross-modal
tower and the heads, a global batch of 4096 for 100k steps. The reference
trained MLM and ITM with random negatives; this config also trains ITC and
draws ITM negatives from the ITC similarity, as the itm-mlm-itc checkpoints
do. Set `objective.itc_weight=0` and `objective.itm_negatives=random` for the
original objectives.

Fields people change:
  data.dataset: a dataset built with `python -m bt_jax.data build` (a path or
    a registered name with data.data_dir).
  tokenizer: a directory with RoBERTa's tokenizer files (vocab.json and
    merges.txt, or tokenizer.json); not needed with init_from.
  init_from: a checkpoint `bt_jax.from_pretrained` reads, to continue
    pretraining instead of starting from random weights.
  mesh_shape: (data, fsdp, tensor); the default shards parameters and
    optimizer state over every device (FSDP).
  global_batch_size, accumulation_steps: examples per step, and the
    microbatches each step is split into to fit in memory.
  dtype, remat: bfloat16 compute and activation rematerialisation.

Before a run, `python -m train.memory --config configs/pretrain_base.py` prints
the bytes per device. As set, 8 devices would each run 256 examples per
microbatch, far more than an accelerator holds. The README's table estimates
23.5 GiB per device at 32, so raise accumulation_steps or add devices until
global_batch_size / (data × fsdp × accumulation_steps) is near 32.
"""

from pathlib import Path

import ml_collections

from bt_jax.training.settings import default_config


def get_config() -> ml_collections.ConfigDict:
    """Return the base pretraining run's config."""
    config = default_config()
    config.model = str(Path(__file__).with_name("base.py"))
    config.total_steps = 100_000
    config.global_batch_size = 4096
    config.accumulation_steps = 2
    config.mesh_shape = (1, -1, 1)
    config.dtype = "bfloat16"
    config.remat = "full"

    config.data.max_text_length = 50
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.worker_count = 8

    config.optimizer.learning_rate = 1e-5
    config.optimizer.warmup_steps = 0.1
    config.optimizer.weight_decay = 0.01
    config.optimizer.lr_mult_cross_modal = 5.0
    config.optimizer.lr_mult_head = 5.0

    config.checkpoint.every_steps = 2000
    config.eval.every_steps = 5000
    config.eval.max_images = 1000
    return config
