"""Training config: fine-tune BridgeTower large for VQAv2.

Run it with

    python -m train --config configs/finetune_vqa_large.py --workdir runs/vqa-large \
        --config.init_from=CHECKPOINT --config.data.dataset=PATH

`init_from` is a pretrained checkpoint (a Hugging Face directory such as
bridgetower-large-itm-mlm, or `python -m convert to-jax` output of an original
checkpoint). Its position table is resampled to 574 px (bicubic), and the VQA
classifier starts at random (two layers, hidden scale 2). The dataset is built
with `python -m bt_jax.data build vqa SOURCE --out DIR` from the official VQA
v2 files; its answer vocabulary (3,129 answers for train and val) sizes the
classifier.

The hyper-parameters are the original repository's recipe
(`scripts/ftfpt_large_vqa.sh`): 574 px images, text length 50, AdamW at 4e-06
with betas (0.9, 0.98) and weight decay 0.05, 0.06 of the steps as warmup then
linear decay to 0, learning-rate multipliers of 5 for the cross-modal tower and
50 for the head, a global batch of 512. `total_steps` = 10 epochs of 443,757
training examples at that batch, ceil(10 x 443,757 / 512) = 8,668; recompute it
for another dataset size or batch.

NOTE: the original also augments the training images (its `blip_randaug_wohf`
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
    """Return the VQAv2 fine-tuning config."""
    config = default_config()
    config.task = "vqa"
    config.image_size = 574
    config.total_steps = 8668
    config.global_batch_size = 512
    config.mesh_shape = (1, -1, 1)
    config.dtype = "bfloat16"
    config.remat = "full"
    config.head.layers = 2
    config.head.hidden_scale = 2.0

    config.data.max_text_length = 50
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.worker_count = 8

    config.optimizer.learning_rate = 4e-06
    config.optimizer.warmup_steps = 0.06
    config.optimizer.weight_decay = 0.05
    config.optimizer.lr_mult_cross_modal = 5.0
    config.optimizer.lr_mult_head = 50.0

    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.max_images = 1000
    return config
