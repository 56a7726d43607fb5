"""`python -m convert`: init-random, to-jax and the verify report, run as a user would."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import run_convert

import bt_jax


def run_cli(*args, check=True):
    completed = run_convert(*args)
    if check:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def tiny_itc(tmp_path_factory):
    """A random tiny ITC checkpoint written by init-random, and its to-jax conversion."""
    root = tmp_path_factory.mktemp("cli")
    run_cli("init-random", "--config", "configs/tiny.py", "--head", "itc", root / "hf")
    run_cli("to-jax", root / "hf", root / "jax")
    return root


def test_help_lists_subcommands():
    completed = run_cli("--help")

    for command in ("to-jax", "to-torch", "verify", "init-random"):
        assert command in completed.stdout


def test_verify_table_passes(tiny_itc):
    completed = run_cli("verify", tiny_itc / "hf", "--jax", tiny_itc / "jax")
    lines = completed.stdout.splitlines()

    assert lines[-1].startswith("PASSED")
    for name in (
        "logits",
        "loss",
        "hidden.text.3",
        "hidden.image.3",
        "hidden.cross.1.image",
    ):
        assert any(line.startswith(name + " ") for line in lines), name


def test_verify_json_report(tiny_itc):
    report = json.loads(run_cli("verify", tiny_itc / "hf", "--json").stdout)
    names = [row["name"] for row in report["outputs"]]

    assert report["passed"] is True
    assert report["head"] == "itc"
    assert "cross_embeds" in names
    assert "hidden.cross.1.text" in names
    assert all(row["max_abs"] < 1e-5 for row in report["outputs"])


def test_verify_locates_first_divergent_layer(tiny_itc, tmp_path):
    model, _ = bt_jax.from_pretrained(tiny_itc / "jax")
    norm = model.bridgetower.cross_modal_text_layers[1].output.LayerNorm
    norm.bias[...] = norm.bias[...] + 0.05
    bt_jax.save_pretrained(model, nnx.state(model, nnx.Param), tmp_path / "bad")

    completed = run_cli(
        "verify", tiny_itc / "hf", "--jax", tmp_path / "bad", "--json", check=False
    )
    rows = {row["name"]: row["ok"] for row in json.loads(completed.stdout)["outputs"]}

    assert completed.returncode == 1
    assert rows["hidden.text.3"] is True
    assert rows["hidden.cross.0.text"] is True
    assert rows["hidden.cross.1.text"] is False
    assert rows["cross_embeds"] is False


def test_verify_only_filters_outputs(tiny_itc):
    report = json.loads(
        run_cli(
            "verify", tiny_itc / "hf", "--json", "--only", "loss,hidden.cross.*"
        ).stdout
    )

    assert [row["name"] for row in report["outputs"]] == [
        "loss",
        "hidden.cross.0.text",
        "hidden.cross.0.image",
        "hidden.cross.1.text",
        "hidden.cross.1.image",
    ]


def test_verify_bfloat16_compute(tiny_itc):
    report = json.loads(
        run_cli(
            "verify",
            tiny_itc / "hf",
            "--json",
            "--dtype",
            "bfloat16",
            "--only",
            "*_embeds",
            "--atol",
            "0.05",
        ).stdout
    )

    assert report["dtype"] == "bfloat16"
    assert report["passed"] is True
    assert (
        report["max_abs"] > 0
    )  # bfloat16 rounding shows, so it really ran in bfloat16


def test_to_jax_keeps_head_and_config(tiny_itc):
    model, params = bt_jax.from_pretrained(tiny_itc / "jax")

    assert type(model).__name__ == "BridgeTowerForContrastiveLearning"
    assert model.config.contrastive_hidden_size == 16
    assert params["logit_scale"][...].dtype == jnp.float32
