"""Statistics of `layers.dropout_mask` and `layers.apply_dropout`.

The masks come from Threefry hashes split into four 16-bit uniforms each, so
the tests check what a broken split would show: the keep rate, independence of
neighbours that share a hash, distinct rows and keys, and an unbiased output.
Bounds are 5 standard deviations, so a correct generator fails about once in
a million runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bt_jax.modeling import layers


def _keep_probability(rate):
    return 1 - round(rate * layers.MASK_LEVELS) / layers.MASK_LEVELS


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 325), (3, 7, 1001), (40_000,)])
def test_dropout_mask_keep_rate_matches_rate(rate, shape):
    mask = np.asarray(layers.dropout_mask(jax.random.key(1), rate, shape))
    assert mask.shape == shape
    assert mask.dtype == bool
    keep = _keep_probability(rate)
    sigma = np.sqrt(keep * (1 - keep) / mask.size)
    assert abs(mask.mean() - keep) < 5 * sigma


def test_mask_threshold_rounds_rate():
    # 0.1 is 6553.6 / 65536 and rounds to 6554 / 65536.
    assert layers.mask_threshold(0.1) == 6554
    assert layers.mask_threshold(0.0) == 0
    assert layers.mask_threshold(1 - 2**-16) == 65535


@pytest.mark.parametrize("rate", [1e-6, 1 - 1e-6, 0.9999999])
def test_mask_threshold_rate_rounding_to_edge_rejected(rate):
    with pytest.raises(ValueError, match=f"dropout rate {rate} rounds to"):
        layers.mask_threshold(rate)


def test_apply_dropout_highest_rate_scale():
    # 65535 of 65536 levels dropped: the kept entries are scaled by 65536.
    x = jnp.ones((64, 4096), jnp.float32)
    rngs = nnx.Rngs(dropout=jax.random.key(8))
    out = np.asarray(layers.apply_dropout(nnx.Dropout(1 - 2**-16), x, rngs))
    assert set(np.unique(out)) <= {0.0, 65536.0}
    assert (out == 0).mean() > 0.99


def test_dropout_mask_scalar_shape():
    mask = layers.dropout_mask(jax.random.key(9), 0.5, ())
    assert mask.shape == ()


@pytest.mark.parametrize("offset", [1, 2, 3, 4, 5])
def test_dropout_mask_neighbours_independent(offset):
    # Lanes 4g..4g+3 of the last axis share one hash. Lane pairs at every
    # offset, within a hash and across hashes, must both be kept at rate p * p.
    rate = 0.5
    mask = np.asarray(layers.dropout_mask(jax.random.key(2), rate, (1000, 1000)))
    both = (mask[:, :-offset] & mask[:, offset:]).mean()
    keep = _keep_probability(rate)
    expected = keep * keep
    sigma = np.sqrt(expected * (1 - expected) / mask[:, offset:].size)
    assert abs(both - expected) < 5 * sigma


def test_dropout_mask_rows_and_keys_differ():
    shape = (8, 512)
    first = np.asarray(layers.dropout_mask(jax.random.key(3), 0.5, shape))
    again = np.asarray(layers.dropout_mask(jax.random.key(3), 0.5, shape))
    other = np.asarray(layers.dropout_mask(jax.random.key(4), 0.5, shape))
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.4
    for row in range(1, shape[0]):
        assert (first[0] != first[row]).mean() > 0.4


def test_dropout_mask_accepts_raw_and_rbg_keys():
    for key in (jax.random.PRNGKey(5), jax.random.key(5, impl="rbg")):
        mask = np.asarray(layers.dropout_mask(key, 0.5, (100, 100)))
        assert 0.4 < mask.mean() < 0.6


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_dropout_mask_rate_outside_range_rejected(rate):
    with pytest.raises(ValueError, match=rf"\[0, 1\), got {rate}"):
        layers.dropout_mask(jax.random.key(0), rate, (4,))


def test_apply_dropout_broadcast_dims_rejected():
    rngs = nnx.Rngs(dropout=jax.random.key(0))
    dropout = nnx.Dropout(0.5, broadcast_dims=(1,))
    with pytest.raises(NotImplementedError, match=r"broadcast_dims=\(1,\)"):
        layers.apply_dropout(dropout, jnp.ones((2, 3)), rngs)


def test_apply_dropout_unbiased_and_scaled():
    rate = 0.1
    x = jnp.ones((200, 1000), jnp.float32)
    out = np.asarray(
        layers.apply_dropout(nnx.Dropout(rate), x, nnx.Rngs(dropout=jax.random.key(6)))
    )
    scale = 1 / _keep_probability(rate)
    assert set(np.unique(out)) <= {0.0, np.float32(scale)}
    keep = _keep_probability(rate)
    sigma = scale * np.sqrt(keep * (1 - keep) / out.size)
    assert abs(out.mean() - 1.0) < 5 * sigma


def test_apply_dropout_passes_through_without_rngs_or_rate():
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(layers.apply_dropout(nnx.Dropout(0.3), x, None), x)
    rngs = nnx.Rngs(dropout=jax.random.key(0))
    np.testing.assert_array_equal(layers.apply_dropout(nnx.Dropout(0.0), x, rngs), x)


def test_apply_dropout_keeps_dtype():
    x = jnp.ones((16, 16), jnp.bfloat16)
    out = layers.apply_dropout(nnx.Dropout(0.5), x, nnx.Rngs(dropout=jax.random.key(7)))
    assert out.dtype == jnp.bfloat16
