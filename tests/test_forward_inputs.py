"""`forward_trace` from precomputed image states equals the pass from pixels.

Training encodes each image once and pairs it with several texts by indexing
the precomputed states (`image_hidden_states`, `image_bridge_inputs`). Both
must give what a pass on the re-paired pixels gives; the pixel pass is the one
that tests/test_parity.py compares with transformers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bt_jax.config import BridgeTowerConfig
from bt_jax.modeling.bridgetower import BridgeTowerModel
from tests.helpers import make_batch, tiny_config

ATOL = 1e-5


def _model(shared_transforms: bool) -> tuple[BridgeTowerModel, dict]:
    data = tiny_config(share_cross_modal_transformer_layers=shared_transforms)
    config = BridgeTowerConfig.from_dict(data)
    model = BridgeTowerModel(config, rngs=nnx.Rngs(params=0))
    return model, make_batch(data, batch=3, empty_row=False)


def _outputs(trace) -> dict[str, np.ndarray]:
    return {
        "text_features": np.asarray(trace.text_features),
        "image_features": np.asarray(trace.image_features),
        "pooler_output": np.asarray(trace.pooler_output),
    }


@pytest.mark.parametrize(
    "shared_transforms", [True, False], ids=["shared", "per-level"]
)
@pytest.mark.parametrize("source", ["image_hidden_states", "image_bridge_inputs"])
def test_forward_trace_repaired_states_match_pixels(shared_transforms, source):
    model, batch = _model(shared_transforms)
    ids = jnp.asarray(batch["input_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    pixels = jnp.asarray(batch["pixel_values"])
    order = jnp.asarray([2, 0, 0])

    expected = _outputs(model.forward_trace(ids, mask, pixels[order]))
    states = model.image_hidden_states(pixels)
    if source == "image_bridge_inputs":
        states = model.image_bridge_inputs(states)
    trace = model.forward_trace(ids, mask, None, **{source: states[:, order]})
    for name, value in _outputs(trace).items():
        np.testing.assert_allclose(value, expected[name], atol=ATOL, err_msg=name)


def test_image_bridge_inputs_shape():
    model, batch = _model(shared_transforms=False)
    states = model.image_hidden_states(jnp.asarray(batch["pixel_values"]))
    inputs = model.image_bridge_inputs(states)
    config = model.config
    assert inputs.shape == (config.num_hidden_layers, *states.shape[1:])


def test_forward_trace_image_bridge_inputs_errors():
    model, batch = _model(shared_transforms=True)
    ids = jnp.asarray(batch["input_ids"])
    pixels = jnp.asarray(batch["pixel_values"])
    states = model.image_hidden_states(pixels)
    inputs = model.image_bridge_inputs(states)
    with pytest.raises(ValueError, match="either pixel_values or image_bridge_inputs"):
        model.forward_trace(ids, None, pixels, image_bridge_inputs=inputs)
    with pytest.raises(ValueError, match="either image_hidden_states or image_bridge"):
        model.forward_trace(
            ids, None, None, image_hidden_states=states, image_bridge_inputs=inputs
        )
    with pytest.raises(ValueError, match=r"image_bridge_inputs have shape"):
        model.forward_trace(ids, None, None, image_bridge_inputs=inputs[:, :2])
    with pytest.raises(ValueError, match=r"image_hidden_states have shape"):
        model.image_bridge_inputs(states[1:])
    with pytest.raises(ValueError, match="image_token_type_idx=2 has no effect"):
        model.forward_trace(
            ids, None, None, image_bridge_inputs=inputs, image_token_type_idx=2
        )


def test_forward_trace_image_bridge_inputs_under_jit():
    model, batch = _model(shared_transforms=True)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(batch["input_ids"])
    pixels = jnp.asarray(batch["pixel_values"])

    @jax.jit
    def pooled(state, ids, pixels):
        backbone = nnx.merge(graphdef, state)
        inputs = backbone.image_bridge_inputs(backbone.image_hidden_states(pixels))
        return backbone.forward_trace(
            ids, None, None, image_bridge_inputs=inputs
        ).pooler_output

    expected = model.forward_trace(ids, None, pixels).pooler_output
    np.testing.assert_allclose(pooled(state, ids, pixels), expected, atol=ATOL)


# Where the class-token branch is taken: at the only level (a Python bool,
# here under remat), at the last of levels run in a Python loop (a NumPy
# bool), and through `lax.cond` where remat or a scan traces the flag.
@pytest.mark.fast_compile
@pytest.mark.parametrize(
    "levels,scan,remat",
    [(1, False, "dots"), (3, False, "none"), (3, False, "dots"), (3, True, "dots")],
)
def test_class_token_path_matches_full_pass(levels, scan, remat):
    # The heads' path (full_image_features=False) must give the full pass's
    # pooled output, text features and gradients. tests/test_parity.py
    # compares the full pass with transformers.
    data = tiny_config(num_hidden_layers=levels)
    model = BridgeTowerModel(BridgeTowerConfig.from_dict(data), rngs=nnx.Rngs(0))
    model.scan_layers, model.remat = scan, remat
    batch = make_batch(data, batch=3)
    ids = jnp.asarray(batch["input_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    pixels = jnp.asarray(batch["pixel_values"])
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, full):
        trace = nnx.merge(graphdef, params).forward_trace(
            ids, mask, pixels, full_image_features=full
        )
        value = jnp.sum(trace.pooler_output**2) + jnp.sum(trace.text_features**2)
        return value, {
            "image_features": trace.image_features,
            "last_image_layer": trace.cross_hidden_states[-1][1],
            "pooler_output": trace.pooler_output,
            "text_features": trace.text_features,
        }

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    expected_grads, expected = grad(params, True)
    grads, trace = grad(params, False)

    for name in ("image_features", "last_image_layer"):
        assert trace[name].shape == (3, 1, data["hidden_size"]), name
        np.testing.assert_allclose(
            trace[name], expected[name][:, :1], atol=ATOL, err_msg=name
        )
    for name in ("pooler_output", "text_features"):
        np.testing.assert_allclose(trace[name], expected[name], atol=ATOL, err_msg=name)
    flat = dict(nnx.to_flat_state(grads))
    for path, value in nnx.to_flat_state(expected_grads):
        np.testing.assert_allclose(
            flat[path][...], value[...], atol=ATOL, err_msg=str(path)
        )
