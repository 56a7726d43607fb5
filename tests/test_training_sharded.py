"""One pretraining step on 8 simulated CPU devices equals the single-device step.

The meshes run in a subprocess, which needs its own XLA_FLAGS for 8 devices.
Gradients and metrics of one step (MLM + ITM + ITC, AdamW, dropout on)
must agree within 1e-5 relative to the single-device step, because sharding
may only reorder floating-point sums. Gradients are compared rather than the updated
parameters: Adam's first update is about the sign of each gradient, so for
gradients that are zero in exact arithmetic (attention key biases; softmax
ignores a constant added to every score of a query) it is the sign of
rounding noise.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO

# TODO: a tensor axis of 2, as in mesh (2, 2, 2), changes results. With the
# same initial parameters, the jitted single-device MLM forward equals the
# eager model, but on (2, 2, 2) its logits differ by about 0.3. XLA warns of an
# "involuntary full rematerialization" at an embedding gather there. Find the
# op, fix it, and add the mesh here.
MESHES = ((8, 1, 1), (2, 4, 1))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from jax.sharding import AxisType, Mesh
    from bt_jax import sharding
    from bt_jax.config import load_preset
    from bt_jax.training.objectives import ObjectiveConfig
    from bt_jax.training.optim import OptimizerConfig
    from bt_jax.training.step import Trainer

    config = load_preset("configs/tiny.py")
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
    }

    def run(mesh):
        trainer = Trainer(
            config,
            ObjectiveConfig(),
            OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10),
            mesh,
        )
        with jax.set_mesh(mesh):
            state = trainer.init(jax.random.key(0))
            arrays = trainer.shard_batch(batch)
            rng = jax.random.fold_in(state.rng, state.step)
            grad_fn = jax.jit(jax.grad(lambda p, b, r: trainer._loss(p, b, r)[0]))
            grads = grad_fn(state.params, arrays, rng)
            state, metrics = trainer.step(state, arrays)
        params = {
            "/".join(map(str, path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
        }
        specs = sorted(
            {str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
        )
        return params, {k: float(v) for k, v in metrics.items()}, specs

    single = Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * 3,
    )
    reference_params, reference_metrics, _ = run(single)
    result = {"devices": jax.device_count(), "meshes": {}}
    for shape in json.loads(sys.argv[1]):
        params, metrics, specs = run(sharding.make_mesh(shape))
        errors = {}
        largest = max(float(np.abs(g).max()) for g in reference_params.values())
        for name, expected in reference_params.items():
            # Gradients that are zero in exact arithmetic (attention key biases)
            # are rounding noise; compare them against a floor instead.
            scale = max(float(np.abs(expected).max()), 1e-3 * largest)
            errors[name] = float(np.abs(params[name] - expected).max()) / scale
        worst = max(errors.values())
        metric_errors = {
            k: abs(metrics[k] - reference_metrics[k]) / max(abs(reference_metrics[k]), 1e-6)
            for k in reference_metrics
        }
        metric_error = max(metric_errors.values())
        result["meshes"][str(tuple(shape))] = {
            "param_relative_error": worst,
            "metric_relative_error": metric_error,
            "sharded_specs": [s for s in specs if s != "PartitionSpec()"],
            "worst_params": sorted(errors.items(), key=lambda kv: -kv[1])[:3],
            "metrics": metric_errors,
        }
    result["reference_metrics"] = reference_metrics
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def sharded_steps():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(MESHES)],
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
