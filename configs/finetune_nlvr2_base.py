"""Training config: fine-tune BridgeTower base for NLVR2.

Run it with

    python -m train --config configs/finetune_nlvr2_base.py --workdir runs/nlvr2-base \
        --config.init_from=CHECKPOINT --config.data.dataset=PATH

`init_from` is a pretrained checkpoint (a Hugging Face directory such as
bridgetower-base-itm-mlm, or `python -m convert to-jax` output of an original
checkpoint). Its position table is resampled to 384 px (bicubic), and the
token-type table grows a third row (a copy of the image row) for the second
image; the classifier starts at random. The dataset is built with `python -m
bt_jax.data build nlvr2 SOURCE --out DIR` from the official NLVR2 files
(`{train,dev,test1}.json` and the image folders).

The hyper-parameters are the original repository's recipe
(`scripts/ftfpt_base_nlvr2.sh`): 384 px images, text length 50, AdamW at 5e-06
with betas (0.9, 0.98) and weight decay 0.008, 0.1 of the steps as warmup then
linear decay to 0, learning-rate multipliers of 5 for the cross-modal tower and
10 for the head, a global batch of 64, and dropout 0.1 on the pooled pair
before the classifier (hidden scale 1.5). `total_steps` = 10 epochs of 86,373
training examples at that batch, ceil(10 x 86,373 / 64) = 13,496; recompute it
for another dataset size or batch.

NOTE: the original also augments the training images (its `blip_randaug_wc`
transform, RandAugment-style); bt-jax's pipeline does not augment, so results
may fall short of the original runs'. Whether they do was not measured.

Fields people change:
  init_from, data.dataset, data.train_split, data.eval_split: the inputs.
  global_batch_size, accumulation_steps, total_steps: the schedule; keep
    total_steps at epochs x examples / global_batch_size.
  mesh_shape, dtype, remat: devices, bfloat16 compute and rematerialisation.
  eval.every_steps, eval.max_images: how often and on how much to evaluate.
"""

import ml_collections

from bt_jax.training.settings import default_config


def get_config() -> ml_collections.ConfigDict:
    """Return the NLVR2 fine-tuning config."""
    config = default_config()
    config.task = "nlvr2"
    config.image_size = 384
    config.total_steps = 13496
    config.global_batch_size = 64
    config.mesh_shape = (1, -1, 1)
    config.dtype = "bfloat16"
    config.remat = "full"
    config.head.layers = 2
    config.head.hidden_scale = 1.5
    config.head.dropout = 0.1

    config.data.max_text_length = 50
    config.data.train_split = "train"
    config.data.eval_split = "dev"
    config.data.worker_count = 8

    config.optimizer.learning_rate = 5e-06
    config.optimizer.warmup_steps = 0.1
    config.optimizer.weight_decay = 0.008
    config.optimizer.lr_mult_cross_modal = 5.0
    config.optimizer.lr_mult_head = 10.0

    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.max_images = 1000
    return config
