"""Parity at the real base architecture (random weights, 288 px, 40 tokens).

About a minute on 2 CPU cores; the checkpoint takes 1.3 GB of temporary disk.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BASE,
    assert_outputs_close,
    make_batch,
    run_jax,
    run_torch,
    torch_model,
)

import bt_jax

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_itm(tmp_path_factory):
    """A random base-size ITM model saved as model.safetensors, and a batch."""
    directory = tmp_path_factory.mktemp("base")
    reference = torch_model(BASE, "itm")
    reference.save_pretrained(directory)
    batch = make_batch(BASE, batch=3, length=40)
    expected = run_torch(reference, "itm", batch)
    del reference
    return directory, batch, expected


def test_base_parity_float32(base_itm):
    directory, batch, expected = base_itm
    model, _ = bt_jax.from_pretrained(directory)

    assert_outputs_close(expected, run_jax(model, "itm", batch), atol=1e-4)


def test_base_bfloat16_itm_probabilities(base_itm):
    directory, batch, expected = base_itm
    model, _ = bt_jax.from_pretrained(directory, dtype=jnp.bfloat16)
    output = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
    )
    probabilities = np.asarray(jax.nn.softmax(output.logits.astype(jnp.float32)))
    reference = np.asarray(jax.nn.softmax(jnp.asarray(expected["logits"])))

    assert np.abs(probabilities - reference).max() < 1e-2
