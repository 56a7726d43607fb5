"""Training config: fine-tune BridgeTower base for COCO image-text retrieval.

Run it with

    python -m train --config configs/finetune_retrieval_base.py --workdir runs/retrieval-base \
        --config.init_from=CHECKPOINT --config.data.dataset=PATH

`init_from` is a pretrained checkpoint (a Hugging Face directory such as
bridgetower-base-itm-mlm, or `python -m convert to-jax` output of an original
checkpoint). Its position table is resampled to 384 px (bicubic), and the ITM
and ITC heads come from the checkpoint when it has them. The dataset is COCO in
Karpathy's split, built with `python -m bt_jax.data build karpathy SOURCE --out
DIR`.

The hyper-parameters are the original repository's recipe
(`scripts/ftfpt_base_irtr_itm_itc_coco.sh`): 384 px images, text length 40,
AdamW at 4.5e-06 with betas (0.9, 0.98) and weight decay 0.01, 0.1 of the steps
as warmup then linear decay to 0, learning-rate multipliers of 5 for the
cross-modal tower and 5 for the head, a global batch of 256, training ITC and
ITM on hard negatives drawn from the ITC similarity (the ALBEF recipe), with
evaluation re-ranking the ITC top 256 candidates by ITM. `total_steps` = 30
epochs of the 566,747 captions of Karpathy's train and restval splits (the
reference trains on both: build them as one split, or train on `train` alone
and recompute) at that batch, ceil(30 x 566,747 / 256) = 66,416; recompute it
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
    """Return the COCO image-text retrieval fine-tuning config."""
    config = default_config()
    config.task = "retrieval"
    config.image_size = 384
    config.total_steps = 66416
    config.global_batch_size = 256
    config.mesh_shape = (1, -1, 1)
    config.dtype = "bfloat16"
    config.remat = "full"
    config.objective.mlm_weight = 0.0
    config.objective.itm_weight = 1.0
    config.objective.itc_weight = 1.0
    config.objective.itm_negatives = "hard"
    config.eval.k_test = 256

    config.data.max_text_length = 40
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.worker_count = 8

    config.optimizer.learning_rate = 4.5e-06
    config.optimizer.warmup_steps = 0.1
    config.optimizer.weight_decay = 0.01
    config.optimizer.lr_mult_cross_modal = 5.0
    config.optimizer.lr_mult_head = 5.0

    config.checkpoint.every_steps = 2000
    config.eval.every_steps = 2000
    # Karpathy's COCO val and test splits have 5,000 images each.
    config.eval.max_images = 5000
    return config
