"""`python -m train.memory`: an ahead-of-time compile of the train step with
bfloat16 compute and per-layer remat, on 4 simulated devices."""

import json
import math
import os
import subprocess
import sys

from helpers import FAST_COMPILE_ENV, REPO

from bt_jax.config import load_preset


def _small_model(directory) -> str:
    config = load_preset(REPO / "configs" / "tiny.py").to_dict()
    config["num_hidden_layers"] = 1
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def _memory(*args, timeout=600) -> subprocess.CompletedProcess:
    """Run `python -m train.memory` with the demo config and `args`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "train.memory",
            "--config",
            str(REPO / "configs" / "demo.py"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        # Memory sizes come from XLA's buffer assignment, before LLVM runs.
        env={**os.environ, **FAST_COMPILE_ENV},
    )


def _parameter_count(model: str) -> int:
    """Count the pretraining model's parameters from abstract shapes."""
    import jax
    from flax import nnx

    from bt_jax.config import BridgeTowerConfig
    from bt_jax.modeling import BridgeTowerForPreTraining

    config = BridgeTowerConfig.from_json_file(model)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(
            lambda: BridgeTowerForPreTraining(config, rngs=nnx.Rngs(0))
        )
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def test_memory_estimate_bf16_remat_on_mesh(tmp_path):
    model = _small_model(tmp_path)
    output = tmp_path / "estimate.json"
    completed = _memory(
        "--devices",
        "4",
        f"--config.model={model}",
        "--config.mesh_shape=(1, 2, 2)",
        "--config.dtype=bfloat16",
        "--config.remat=full",
        "--config.global_batch_size=4",
        "--config.data.max_text_length=12",
        "--json",
        str(output),
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "per device:" in completed.stdout
    result = json.loads(output.read_text())
    assert result["devices"] == 4
    assert result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert result["dtype"] == "bfloat16"
    count = _parameter_count(model)
    assert result["parameters"] == count
    # float32 parameters split over fsdp and tensor: the largest shard has
    # between a quarter and all of them (small vectors are replicated).
    assert count * 4 / 4 <= result["params_bytes"] < count * 4
    # AdamW keeps two moments per parameter, sharded like the parameters.
    assert 2 * result["params_bytes"] <= result["optimizer_bytes"]
    assert result["optimizer_bytes"] < 2 * result["params_bytes"] + 1024
    pixels = 4 * 32 * 32 * 3 * 4 // 2  # float32, batch split two ways
    assert result["batch_bytes"] >= pixels
    assert result["temporary_bytes"] > 0


def test_memory_bad_mesh_is_one_line_error(tmp_path):
    completed = _memory(
        "--devices",
        "4",
        "--config.mesh_shape=(3, 1, 1)",
        timeout=300,
    )
    assert completed.returncode == 2
    assert "config.mesh_shape" in completed.stderr
    assert "needs 3 devices but 4 are available" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_memory_nocompile_counts_state_only(tmp_path):
    model = _small_model(tmp_path)
    output = tmp_path / "estimate.json"
    completed = _memory(
        "--devices",
        "2",
        "--nocompile",
        f"--config.model={model}",
        "--config.mesh_shape=(1, 2, 1)",
        "--config.global_batch_size=4",
        "--json",
        str(output),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "temporaries are not counted" in completed.stdout
    result = json.loads(output.read_text())
    assert result["temporary_bytes"] is None
    assert result["compile_seconds"] is None
    expected = (
        result["params_bytes"] + result["optimizer_bytes"] + result["batch_bytes"]
    )
    assert result["total_bytes"] == expected
    # Every dimension of width 64 splits two ways over fsdp; the rest is small.
    assert result["params_bytes"] < _parameter_count(model) * 4 * 0.6


def test_memory_unwritable_json_fails_first(tmp_path):
    missing = tmp_path / "missing" / "estimate.json"
    completed = _memory("--json", str(missing), timeout=300)
    assert completed.returncode == 2
    assert f"directory {missing.parent} does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr
    # The check runs before the model is built, so no estimate is printed.
    assert "per device" not in completed.stdout
