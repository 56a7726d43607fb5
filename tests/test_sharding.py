"""Sharded loading on 8 simulated CPU devices (run in a subprocess, which needs its own XLA_FLAGS)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from helpers import make_batch, run_jax, run_torch, tiny_config, torch_model
    import bt_jax
    from bt_jax import sharding

    out = sys.argv[1]
    config = tiny_config()
    reference = torch_model(config, "mlm")
    reference.save_pretrained(out + "/hf")
    batch = make_batch(config)
    expected = run_torch(reference, "mlm", batch)
    mesh = sharding.make_mesh((2, 2, 2))
    model, _ = bt_jax.from_pretrained(out + "/hf", mesh=mesh)
    bt_jax.save_pretrained(model, _, out + "/jax")
    restored, _ = bt_jax.from_pretrained(out + "/jax", mesh=mesh)
    result = {"devices": jax.device_count()}
    for name, loaded in (("hf", model), ("jax", restored)):
        layer = loaded.bridgetower.text_model.encoder.layer[0]
        result[name + "_ffn_spec"] = list(layer.intermediate.dense.kernel[...].sharding.spec)
        result[name + "_vocab_spec"] = list(loaded.mlm_score.decoder.kernel[...].sharding.spec)
        with jax.set_mesh(mesh):
            actual = run_jax(loaded, "mlm", batch)
        result[name + "_max_diff"] = max(
            float(np.abs(actual[k] - expected[k]).max()) for k in expected
        )
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def sharded_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_sharded_load_uses_eight_devices(sharded_result):
    assert sharded_result["devices"] == 8


@pytest.mark.parametrize("source", ["hf", "jax"])
def test_sharded_load_places_ffn_by_rules(sharded_result, source):
    assert sharded_result[f"{source}_ffn_spec"] == ["fsdp", "tensor"]


@pytest.mark.parametrize("source", ["hf", "jax"])
def test_sharded_load_replicates_indivisible_vocab(sharded_result, source):
    # The tiny vocabulary (99) does not split over tensor=2, so that axis stays whole.
    assert sharded_result[f"{source}_vocab_spec"] == ["fsdp", None]


@pytest.mark.parametrize("source", ["hf", "jax"])
def test_sharded_model_matches_reference(sharded_result, source):
    assert sharded_result[f"{source}_max_diff"] < 1e-5
