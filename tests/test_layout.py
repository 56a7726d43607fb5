"""The train state's stacked layers: layout, gradients and the copy they avoid.

With `scan_layers`, `Trainer` stores each scanned run of layers stacked. The
layout must split back into exactly the model's per-layer parameters. A step
on the stacked state must compute the gradients of the unrolled model, which
never stacks anything. The compiled step must contain no concatenation that
rebuilds a stacked run, which stacking inside the step needed. Checkpoints of
per-layer states must still resume.
"""

import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from bt_jax import sharding
from bt_jax.checkpoint import CheckpointMismatchError, RunCheckpoints
from bt_jax.config import BridgeTowerConfig
from bt_jax.modeling.heads import BridgeTowerForPreTraining
from bt_jax.training import layout
from bt_jax.training.objectives import ObjectiveConfig
from bt_jax.training.optim import OptimizerConfig
from bt_jax.training.step import Trainer
from train.loop import restore_target

# Compares JAX programs with each other and checks behaviour only.
pytestmark = pytest.mark.fast_compile

# Three levels, so the cross-modal runs (levels 1 and 2) are real stacks.
VARIANTS = {
    "link_towers_per_level": tiny_config(num_hidden_layers=3),
    "transforms_per_level_shared_link_tower": tiny_config(
        num_hidden_layers=3,
        share_cross_modal_transformer_layers=False,
        share_link_tower_layers=True,
    ),
    "transforms_and_link_towers_per_level": tiny_config(
        num_hidden_layers=3, share_cross_modal_transformer_layers=False
    ),
}


def _trainer(
    variant: str, scan_layers: bool = True, objective: ObjectiveConfig | None = None
) -> Trainer:
    return Trainer(
        BridgeTowerConfig.from_dict(VARIANTS[variant]),
        objective or ObjectiveConfig(),
        OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10),
        sharding.make_mesh((1, 1, 1)),
        scan_layers=scan_layers,
    )


def _per_layer_params(trainer: Trainer, seed: int = 0) -> dict:
    """Return a fresh model's parameters, as `nnx.to_pure_dict` lays them out."""
    model = BridgeTowerForPreTraining(
        trainer.config, heads=trainer.objective.heads, rngs=nnx.Rngs(seed)
    )
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree: dict) -> dict:
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _batch(trainer: Trainer, size: int = 4, length: int = 10) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 99, (size, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = np.full((size, length), -100, np.int32)
    labels[:, 2:4] = ids[:, 2:4]
    masked = ids.copy()
    masked[:, 2:4] = 4
    side = trainer.config.vision_config.image_size
    return trainer.shard_batch(
        {
            "input_ids": ids,
            "attention_mask": np.ones((size, length), np.int32),
            "mlm_input_ids": masked,
            "mlm_labels": labels,
            "pixel_values": rng.normal(size=(size, side, side, 3)).astype(np.float32),
            "record_index": np.arange(size, dtype=np.int32),
        }
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stacked_layout_round_trip_is_exact(variant):
    trainer = _trainer(variant)
    params = _per_layer_params(trainer)
    stacked = trainer.stack_params(params)
    runs = trainer.layout.runs
    # Text layers, vision blocks and both cross-modal stacks at least.
    assert len(runs) >= 4
    for run in runs:
        node = stacked
        for key in run.path:
            node = node[key]
        for leaf in jax.tree.leaves(node[layout.STACKED]):
            assert leaf.shape[0] == run.stop - run.start
    # Runs that start after layer 0 keep the layers before them unstacked.
    cross = stacked["bridgetower"]["cross_modal_text_layers"]
    assert list(cross[layout.LAYERS]) == [0]
    restored = trainer.unstack_params(stacked)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    expected, actual = _flat(params), _flat(restored)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_stacked_layout_rejects_parameters_of_another_layout():
    trainer = _trainer("link_towers_per_level")
    params = _per_layer_params(trainer)
    with pytest.raises(ValueError, match="stacked already"):
        trainer.stack_params(trainer.stack_params(params))
    with pytest.raises(ValueError, match="per-layer already"):
        trainer.unstack_params(params)
    with pytest.raises(TypeError, match=r"nnx\.to_pure_dict"):
        trainer.stack_params(nnx.State(params))


def test_init_from_params_consumes_stacked_layers():
    trainer = _trainer("link_towers_per_level")
    params = jax.tree.map(jnp.asarray, _per_layer_params(trainer))
    expected = jax.tree.map(np.array, params)
    layer = params["bridgetower"]["text_model"]["encoder"]["layer"][0]
    state = trainer.init_from_params(params, jax.random.key(0))
    # The layers of a stacked run are deleted once stacked: the state never
    # needs them and the stack at once.
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(layer))
    restored = _flat(jax.tree.map(np.asarray, trainer.unstack_params(state.params)))
    for name, value in _flat(expected).items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_per_layer_checkpoint_resumes_stacked(tmp_path):
    # Checkpoints written before scanned runs were stored stacked keep every
    # layer on its own; resuming restores that layout and stacks it.
    scanned = _trainer("link_towers_per_level")
    per_layer = _trainer("link_towers_per_level", scan_layers=False)
    state = _filled_state(per_layer)
    params = jax.tree.map(np.array, state.params)
    moments = jax.tree.map(np.array, state.opt_state)
    checkpoints = RunCheckpoints(tmp_path, keep=1, async_save=False)
    checkpoints.save(1, state, _Iterator())
    checkpoints.wait()
    abstract = scanned.abstract_state()
    with pytest.raises(CheckpointMismatchError):
        checkpoints.check_compatible(1, abstract)
    target = restore_target(scanned, checkpoints, 1, abstract)
    assert jax.tree.structure(target) == jax.tree.structure(per_layer.abstract_state())
    restored = scanned.stack_state(checkpoints.restore(1, target, _Iterator()))
    checkpoints.close()
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    unstacked = _flat(scanned.unstack_params(restored.params))
    for name, value in _flat(params).items():
        np.testing.assert_array_equal(unstacked[name], value, err_msg=name)
    expected = _flat(scanned.stack_state(state._replace(opt_state=moments)).opt_state)
    for name, value in _flat(restored.opt_state).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_checkpoint_of_other_model_still_rejected(tmp_path):
    other = _trainer("transforms_and_link_towers_per_level", scan_layers=False)
    checkpoints = RunCheckpoints(tmp_path, keep=1, async_save=False)
    checkpoints.save(1, _filled_state(other), _Iterator())
    checkpoints.wait()
    scanned = _trainer("link_towers_per_level")
    with pytest.raises(CheckpointMismatchError, match="another model"):
        restore_target(scanned, checkpoints, 1, scanned.abstract_state())
    checkpoints.close()


def _filled_state(trainer: Trainer):
    """Return a state of `trainer`'s layout with distinct values in every array.

    A row stacked out of place then shows as a difference.
    """

    def fill(shape):
        if jnp.issubdtype(shape.dtype, jnp.floating):
            return jnp.arange(shape.size, dtype=shape.dtype).reshape(shape.shape)
        return jnp.zeros(shape.shape, shape.dtype)

    abstract = trainer.abstract_state()
    return abstract._replace(
        step=fill(abstract.step),
        params=jax.tree.map(fill, abstract.params),
        opt_state=jax.tree.map(fill, abstract.opt_state),
        rng=jax.random.key(1),
    )


class _Iterator(grain.DatasetIterator):
    """A grain iterator with a position to save and restore."""

    def __init__(self):
        super().__init__()
        self.position = 0

    def __next__(self):
        self.position += 1
        return self.position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_stacked_layout_shared_modules_stay_single():
    # A shared link tower is one module applied at every level: stacking it
    # would give each level its own copy to train.
    trainer = _trainer("transforms_per_level_shared_link_tower")
    paths = {run.path[-1] for run in trainer.layout.runs}
    assert "cross_modal_text_transform" in paths
    assert "cross_modal_text_link_tower" not in paths
    assert "cross_modal_image_link_tower" not in paths
    assert not _trainer("link_towers_per_level", scan_layers=False).layout.runs


def test_stacked_state_gradients_match_unrolled_model():
    # The unrolled trainer keeps per-layer parameters and never stacks, so it
    # is an independent reference for the stacked state's gradients. This
    # variant stacks every kind of run.
    variant = "transforms_and_link_towers_per_level"
    scanned, unrolled = _trainer(variant), _trainer(variant, scan_layers=False)
    assert len(scanned.layout.runs) == 7
    params = _per_layer_params(scanned)
    batch = _batch(scanned)
    rng = jax.random.key(3)
    states = [
        trainer.init_from_params(jax.tree.map(np.array, params), jax.random.key(0))
        for trainer in (scanned, unrolled)
    ]
    grads, metrics = scanned.gradients(states[0].params, batch, rng)
    expected_grads, expected_metrics = unrolled.gradients(states[1].params, batch, rng)
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    expected, actual = _flat(expected_grads), _flat(scanned.unstack_params(grads))
    assert set(actual) == set(expected)
    scale = max(float(np.abs(g).max()) for g in expected.values())
    for name, value in expected.items():
        np.testing.assert_allclose(
            actual[name], value, rtol=1e-4, atol=1e-6 * scale, err_msg=name
        )
    # The step's state keeps the layout through the optimizer update.
    new_state, _ = jax.eval_shape(scanned.step, states[0], batch)
    assert jax.tree.structure(new_state.params) == jax.tree.structure(states[0].params)


def _forward_concatenations(hlo: str, shapes: set[str]) -> list[str]:
    """Return the HLO lines of the forward pass that concatenate into `shapes`.

    The backward pass may concatenate gradients: layers that run in several
    scans (the text encoder, once per kind of text) get one stacked gradient
    per scan, summed row by row and stacked again. That writes the gradient
    buffer the step needs anyway; it copies no parameters.
    """
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= f32\[([\d,]+)\]\S* concatenate\(", line)
        if match and match.group(1) in shapes and "transpose(" not in line:
            found.append(line.strip())
    return found


def test_step_reads_stacked_layers_without_copying_them():
    # MLM alone runs every scanned run and compiles faster than all heads.
    mlm_only = ObjectiveConfig(itm_weight=0.0, itc_weight=0.0)
    trainer = _trainer("link_towers_per_level", objective=mlm_only)
    batch = _batch(trainer)
    abstract = trainer.abstract_state()
    shapes = set()
    for run in trainer.layout.runs:
        node = abstract.params
        for key in run.path:
            node = node[key]
        for leaf in jax.tree.leaves(node[layout.STACKED]):
            # Stacked kernels only: a stacked bias or LayerNorm scale has the
            # shape (layers, width) of many activations, such as a batch of
            # pooled features.
            if leaf.ndim >= 3:
                shapes.add(",".join(map(str, leaf.shape)))
    assert shapes
    rng = jax.random.key(0)
    step_hlo = trainer.step.lower(abstract, batch).compile().as_text()
    assert _forward_concatenations(step_hlo, shapes) == []

    # The control: gradients of per-layer parameters, stacked inside the
    # jitted function as the step did before, do concatenate. This shows the
    # search above can find such copies.
    def restacking(params, batch, rng):
        return trainer._gradients(trainer.stack_params(params), batch, rng)

    per_layer = jax.eval_shape(lambda: _per_layer_params(trainer))
    control_hlo = jax.jit(restacking).lower(per_layer, batch, rng).compile().as_text()
    assert _forward_concatenations(control_hlo, shapes)
