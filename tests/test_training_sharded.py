"""One pretraining step on 8 simulated CPU devices equals the single-device step.

The meshes run in a subprocess, which needs its own XLA_FLAGS for 8 devices.
Gradients and metrics of one step (MLM + ITM + ITC, dropout on) must agree
within 1e-5 relative to the single-device step, because sharding
may only reorder floating-point sums. Gradients are compared rather than the updated
parameters: Adam's first update is about the sign of each gradient, so for
gradients that are zero in exact arithmetic (attention key biases; softmax
ignores a constant added to every score of a query) it is the sign of
rounding noise.

The same script also runs the single-device step without dropout twice: as
three separate passes (`fuse_passes=False`, the original recipe) and fused
into one batch (the default). Both must give the same numbers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import FAST_COMPILE_ENV, REPO

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
# Per-layer rematerialisation on some meshes: it must not change the numbers
# either, and sharing the runs keeps the test's compile count down.
REMAT = {(8, 1, 1): "none", (2, 4, 1): "full", (2, 2, 2): "dots"}

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from jax.sharding import AxisType, Mesh
    from bt_jax import sharding
    from bt_jax.config import BridgeTowerConfig, load_preset
    from bt_jax.training.objectives import ObjectiveConfig
    from bt_jax.training.optim import OptimizerConfig
    from bt_jax.training.step import Trainer

    # Fewer layers than the tiny preset compile faster; every kind of layer stays.
    preset = load_preset("configs/tiny.py").to_dict()
    preset["num_hidden_layers"] = 1
    preset["text_config"]["num_hidden_layers"] = 2
    preset["vision_config"]["num_hidden_layers"] = 2
    config = BridgeTowerConfig.from_dict(preset)
    rng = np.random.default_rng(0)
    size, length = 8, 12
    ids = rng.integers(5, 99, (size, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = np.full((size, length), -100, np.int32)
    labels[:, 3:5] = ids[:, 3:5]
    masked = ids.copy()
    masked[:, 3:5] = 4
    batch = {
        "pixel_values": rng.normal(size=(size, 32, 32, 3)).astype(np.float32),
        "input_ids": ids,
        "attention_mask": np.ones((size, length), np.int32),
        "mlm_input_ids": masked,
        "mlm_labels": labels,
        # Pairs of rows share a record, so ITM negatives skip their partner.
        "record_index": np.arange(size, dtype=np.int32) // 2,
    }

    def run(mesh, remat="none", fuse=True, config=config, state=None):
        trainer = Trainer(
            config,
            ObjectiveConfig(fuse_passes=fuse),
            OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10),
            mesh,
            remat=remat,
        )
        # No mesh is entered here, as in the training program: the trainer's
        # jitted functions must apply the activation constraints themselves.
        if state is None:
            state = trainer.init(jax.random.key(0))
        arrays = trainer.shard_batch(batch)
        # The step's gradients and metrics, from the step's own key; the
        # optimizer update after them is elementwise.
        rng = jax.random.fold_in(state.rng, state.step)
        grads, metrics = trainer.gradients(state.params, arrays, rng)
        params = {
            "/".join(map(str, path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
        }
        specs = sorted(
            {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
        )
        return params, {k: float(v) for k, v in metrics.items()}, specs, state

    single = Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * 3,
    )
    def compare(params, metrics, reference_params, reference_metrics):
        errors = {}
        largest = max(float(np.abs(g).max()) for g in reference_params.values())
        for name, expected in reference_params.items():
            # Gradients that are zero in exact arithmetic (attention key biases)
            # are rounding noise; compare them against a floor instead.
            scale = max(float(np.abs(expected).max()), 1e-3 * largest)
            errors[name] = float(np.abs(params[name] - expected).max()) / scale
        metric_errors = {
            k: abs(metrics[k] - reference_metrics[k]) / max(abs(reference_metrics[k]), 1e-6)
            for k in reference_metrics
        }
        return {
            "param_relative_error": max(errors.values()),
            "metric_relative_error": max(metric_errors.values()),
            "worst_params": sorted(errors.items(), key=lambda kv: -kv[1])[:3],
            "metrics": metric_errors,
        }

    result = {"devices": jax.device_count(), "meshes": {}}
    # Without dropout, the three passes run separately (fuse_passes=False) must
    # give what the fused step gives.
    text = dataclasses.replace(
        config.text_config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    deterministic = config.replace(text_config=text)
    fused = run(single, config=deterministic)
    # The dropout rate and fusing do not change the initial parameters, so the
    # single-device runs share the first run's state instead of compiling init.
    separate = run(single, fuse=False, config=deterministic, state=fused[3])
    result["separate_passes"] = compare(*separate[:2], *fused[:2])

    reference_params, reference_metrics, _, _ = run(single, state=fused[3])
    for shape, remat in json.loads(sys.argv[1]):
        params, metrics, specs, _ = run(sharding.make_mesh(shape), remat)
        result["meshes"][str(tuple(shape))] = {
            **compare(params, metrics, reference_params, reference_metrics),
            "sharded_specs": [s for s in specs if s != "PartitionSpec()"],
        }
    result["reference_metrics"] = reference_metrics
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def sharded_steps():
    # Every run is compared with another JAX run, so LLVM's optimisations are
    # off. That cut the fixture's CPU time by about a third on 2 cores.
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        **FAST_COMPILE_ENV,
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            json.dumps([[shape, REMAT[shape]] for shape in MESHES]),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_sharded_step_runs_on_eight_devices(sharded_steps):
    assert sharded_steps["devices"] == 8


def test_sharded_step_loss_is_finite(sharded_steps):
    metrics = sharded_steps["reference_metrics"]
    for name in ("loss", "mlm_loss", "itm_loss", "itc_loss"):
        assert 0 < metrics[name] < 100, (name, metrics[name])


@pytest.mark.parametrize("shape", [str(shape) for shape in MESHES])
def test_sharded_step_grads_match_single_device(sharded_steps, shape):
    result = sharded_steps["meshes"][shape]
    assert result["param_relative_error"] < 1e-5, result["worst_params"]


@pytest.mark.parametrize("shape", [str(shape) for shape in MESHES])
def test_sharded_step_metrics_match_single_device(sharded_steps, shape):
    result = sharded_steps["meshes"][shape]
    assert result["metric_relative_error"] < 1e-5, result["metrics"]


@pytest.mark.parametrize("shape", ["(2, 4, 1)"])
def test_sharded_step_keeps_parameters_sharded(sharded_steps, shape):
    specs = sharded_steps["meshes"][shape]["sharded_specs"]
    assert any("fsdp" in spec for spec in specs), specs


def test_sharded_step_splits_parameters_over_tensor(sharded_steps):
    specs = sharded_steps["meshes"]["(2, 2, 2)"]["sharded_specs"]
    assert any("tensor" in spec for spec in specs), specs


def test_fused_step_matches_separate_passes(sharded_steps):
    # One vision encoding and one cross-modal batch for the MLM, positive and
    # negative pairs must give the gradients and metrics of the three passes.
    result = sharded_steps["separate_passes"]
    assert result["param_relative_error"] < 1e-5, result["worst_params"]
    assert result["metric_relative_error"] < 1e-5, result["metrics"]
