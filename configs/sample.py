"""Model preset: the tiny model with a vocabulary for the sample-caption tokenizer.

The same architecture as `configs/tiny.py`, but with a 1000-token vocabulary, so
that `python -m convert init-random --config configs/sample.py --processor`
can write a byte-level BPE tokenizer trained on the bundled sample captions, and
64 px images (4x4 patches), so the sample photos keep some detail. The weights
are random: use it to run the notebook and the inference API end to end.
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the preset as a `config.json`-shaped ConfigDict."""
    spec = importlib.util.spec_from_file_location(
        "tiny_preset", Path(__file__).with_name("tiny.py")
    )
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    config.text_config.vocab_size = 1000
    config.vision_config.image_size = 64
    return config
