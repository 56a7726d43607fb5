"""Training config: pretrain a small BridgeTower from scratch on the sample photos.

Run it with

    python -m train --config configs/demo.py --workdir runs/train-demo

It needs no download. The program builds the 15 bundled sample photos and their
captions as a dataset, trains a byte-level BPE vocabulary on the captions, and
trains the model of `configs/sample.py` (64 px images, 3 text and 3 vision
layers of width 64) with MLM, ITM and ITC. Evaluation scores the same photos,
so retrieval recall shows what the model memorised, not how it generalises.

NOTE: in these 400 steps ITC learns to retrieve every photo but ITM stays at
chance (its loss stays near that of always answering "no match"). Whether
more steps make it learn was not measured.

Fields people change:
  total_steps, global_batch_size: length and batch of the run.
  optimizer.learning_rate: the peak learning rate.
  mesh_shape: (data, fsdp, tensor) sizes; -1 takes the remaining devices.
  eval.every_steps, checkpoint.every_steps: the cadences.
"""

from pathlib import Path

import ml_collections

from bt_jax.training.settings import default_config


def get_config() -> ml_collections.ConfigDict:
    """Return the demo run's config."""
    config = default_config()
    config.model = str(Path(__file__).with_name("sample.py"))
    config.total_steps = 400
    config.global_batch_size = 16
    config.log_every_steps = 20
    config.seed = 0

    config.data.dataset = "samples"
    config.data.train_split = "train"
    config.data.eval_split = "train"
    config.data.max_text_length = 32
    config.data.texts = "all"

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 0.05
    config.optimizer.weight_decay = 0.01
    config.optimizer.lr_mult_cross_modal = 1.0
    config.optimizer.lr_mult_head = 1.0

    config.checkpoint.every_steps = 200
    config.eval.every_steps = 100
    config.eval.batch_size = 32
    return config
