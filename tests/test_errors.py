"""Bad paths, configs, checkpoint files and model inputs: the error type and its message.

Each test checks the exception type, the offending value in the message and the
advice the message gives, so a vague or misleading message fails here.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
from flax import nnx
from helpers import (
    assert_outputs_close,
    make_batch,
    run_convert,
    run_jax,
    run_torch,
    tiny_config,
    torch_model,
)

import bt_jax
from bt_jax.config import BridgeTowerConfig
from bt_jax.weights.io import CheckpointFileError
from bt_jax.weights.mapping import CheckpointMismatchError
from convert.__main__ import main as convert_main

# After a failed read of a damaged checkpoint, Orbax leaves coroutines unawaited;
# pytest reports them, with a long TensorStore spec, in whichever test runs next.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)

CONFIG = tiny_config()
MAX_TEXT_LENGTH = (
    CONFIG["text_config"]["max_position_embeddings"]
    - CONFIG["text_config"]["pad_token_id"]
    - 1
)


@pytest.fixture(scope="module")
def model():
    """A randomly initialised bt-jax backbone of the tiny config."""
    return bt_jax.create_model(BridgeTowerConfig.from_dict(CONFIG), "model")


def save_reference(directory, head="model", **kwargs):
    """Save a random transformers model for `head` to `directory` and return it."""
    model = torch_model(CONFIG, head)
    model.save_pretrained(directory, **kwargs)
    return model


def save_state_dict(state, source, directory):
    """Write `state` as model.safetensors, with the config.json of `source`."""
    directory.mkdir()
    source.save_pretrained(directory)
    safetensors.torch.save_file(
        state, directory / "model.safetensors", metadata={"format": "pt"}
    )


def write_config(directory, config) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def partial_siblings(path) -> list[str]:
    """Return the staging directories that atomic_directory left next to `path`."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


# Checkpoint paths.


def test_missing_directory_raises(tmp_path):
    path = tmp_path / "absent"

    with pytest.raises(FileNotFoundError) as raised:
        bt_jax.from_pretrained(path)

    message = str(raised.value)
    assert str(path) in message
    assert "save_pretrained" in message


def test_file_path_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")

    with pytest.raises(NotADirectoryError) as raised:
        bt_jax.from_pretrained(path)

    message = str(raised.value)
    assert str(path) in message
    assert "pass the directory that contains config.json" in message


def test_missing_config_raises(tmp_path):
    save_reference(tmp_path)
    (tmp_path / "config.json").unlink()

    with pytest.raises(FileNotFoundError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(tmp_path / "config.json") in message
    assert "needs a config.json next to its weights" in message


def test_missing_weights_raises(tmp_path):
    write_config(tmp_path, CONFIG)

    with pytest.raises(FileNotFoundError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert f"no weights found in {tmp_path}" in message
    assert "model.safetensors" in message
    assert "pytorch_model.bin" in message


def test_unknown_head_raises(tmp_path):
    save_reference(tmp_path)

    with pytest.raises(ValueError, match=re.escape("head='caption'")) as raised:
        bt_jax.from_pretrained(tmp_path, head="caption")

    assert "model, mlm, itm, itc, vqa, nlvr2, snli-ve" in str(raised.value)


# config.json.


def test_wrong_model_type_raises(tmp_path):
    write_config(tmp_path, tiny_config(model_type="clip"))

    with pytest.raises(ValueError, match="model_type is 'clip'") as raised:
        bt_jax.from_pretrained(tmp_path)

    assert '"model_type": "bridgetower"' in str(raised.value)


def test_invalid_json_config_raises(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bridgetower",')

    with pytest.raises(ValueError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(tmp_path / "config.json") in message
    assert "not valid JSON" in message


def test_json_array_config_raises(tmp_path):
    (tmp_path / "config.json").write_text("[]")

    with pytest.raises(ValueError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(tmp_path / "config.json") in message
    assert "must contain a JSON object" in message


# Each case: overrides of the tiny config, the offending setting as the message
# names it, and the advice the message gives.
INVALID_CONFIGS = {
    "heads_not_dividing": (
        {"text_config": {"num_attention_heads": 5}},
        "text_config.hidden_size=64 is not divisible by "
        "text_config.num_attention_heads=5",
        "choose a head count that divides the hidden size",
    ),
    "vision_depth_differs": (
        {"vision_config": {"num_hidden_layers": 4}},
        "vision_config.num_hidden_layers=4 differs from text_config.num_hidden_layers=3",
        "give them the same depth",
    ),
    "too_many_cross_layers": (
        {"num_hidden_layers": 4},
        "num_hidden_layers=4 cross-modal layers",
        "use between 1 and 3",
    ),
    "unknown_link_tower": (
        {"link_tower_type": "concat"},
        "link_tower_type='concat' is not supported",
        "use one of add, scaled_add, interpolate",
    ),
    "hidden_size_differs": (
        {"hidden_size": 128},
        "hidden_size=128 differs from text_config.hidden_size=64",
        "both must be equal",
    ),
    "zero_heads": (
        {"text_config": {"num_attention_heads": 0}},
        "text_config.num_attention_heads=0",
        "must be a positive integer",
    ),
    "zero_vocabulary": (
        {"text_config": {"vocab_size": 0}},
        "text_config.vocab_size=0",
        "must be a positive integer",
    ),
    "missing_pad_token": (
        {"text_config": {"pad_token_id": None}},
        "text_config.pad_token_id=None",
        "must be an integer",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGS))
def test_invalid_config_raises(case):
    overrides, value, advice = INVALID_CONFIGS[case]

    with pytest.raises(ValueError) as raised:
        BridgeTowerConfig.from_dict(tiny_config(**overrides))

    message = str(raised.value)
    assert value in message
    assert advice in message


# Weight files.


@pytest.mark.parametrize("size", ["half", "50_bytes"])
def test_truncated_safetensors_raises(tmp_path, size):
    save_reference(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if size == "half" else data[:50])

    with pytest.raises(CheckpointFileError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(path) in message
    assert "truncated or corrupt" in message


def test_truncated_bin_raises(tmp_path):
    source = torch_model(CONFIG, "model")
    path = tmp_path / "pytorch_model.bin"
    source.config.save_pretrained(tmp_path)
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointFileError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(path) in message
    assert "truncated or corrupt" in message


def test_missing_shard_raises(tmp_path):
    save_reference(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()

    with pytest.raises(FileNotFoundError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert f"shard {shard.name} listed in model.safetensors.index.json" in message
    assert "copy every shard the index names" in message


def test_invalid_index_raises(tmp_path):
    write_config(tmp_path, CONFIG)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')

    with pytest.raises(CheckpointFileError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert str(index) in message
    assert "needs a 'weight_map' object" in message


# Tensors that do not match the config.


def test_shape_mismatch_raises(tmp_path):
    save_reference(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 256
    write_config(tmp_path, config)

    with pytest.raises(CheckpointMismatchError) as raised:
        bt_jax.from_pretrained(tmp_path)

    message = str(raised.value)
    assert (
        "text_model.encoder.layer.0.intermediate.dense.weight: "
        "checkpoint [128, 64], model [256, 64]"
    ) in message
    assert "Check that config.json describes these weights" in message


def test_unknown_tensor_raises(tmp_path):
    source = torch_model(CONFIG, "model")
    state = {**source.state_dict(), "extra.weight": torch.zeros(3, 4)}
    save_state_dict(state, source, tmp_path / "hf")

    with pytest.raises(CheckpointMismatchError) as raised:
        bt_jax.from_pretrained(tmp_path / "hf")

    message = str(raised.value)
    assert "match no model parameter" in message
    assert "extra.weight [3, 4]" in message


def test_unknown_tensor_in_own_head_raises(tmp_path):
    source = torch_model(CONFIG, "itm")
    state = {**source.state_dict(), "itm_score.extra.weight": torch.zeros(3, 4)}
    save_state_dict(state, source, tmp_path / "hf")

    with pytest.raises(CheckpointMismatchError, match=r"itm_score\.extra\.weight"):
        bt_jax.from_pretrained(tmp_path / "hf")


def test_missing_tensor_raises(tmp_path):
    source = torch_model(CONFIG, "model")
    state = dict(source.state_dict())
    del state["text_model.pooler.dense.weight"]
    save_state_dict(state, source, tmp_path / "hf")

    with pytest.raises(CheckpointMismatchError) as raised:
        bt_jax.from_pretrained(tmp_path / "hf")

    message = str(raised.value)
    assert "missing from the checkpoint (expected shapes)" in message
    assert "text_model.pooler.dense.weight [64, 64]" in message


def test_duplicate_tensor_raises(tmp_path):
    source = torch_model(CONFIG, "model")
    state = dict(source.state_dict())
    key = "text_model.pooler.dense.bias"
    state[f"bridgetower.{key}"] = state[key].clone()
    save_state_dict(state, source, tmp_path / "hf")

    with pytest.raises(CheckpointMismatchError) as raised:
        bt_jax.from_pretrained(tmp_path / "hf")

    message = str(raised.value)
    assert f"stores {key!r} twice" in message
    assert "keep one copy" in message


def test_damaged_bt_jax_checkpoint_raises(tmp_path, model):
    bt_jax.save_pretrained(model, nnx.state(model, nnx.Param), tmp_path / "jax")
    for path in (tmp_path / "jax" / "params").iterdir():
        if path.is_file():
            path.unlink()

    with pytest.raises(ValueError) as raised:
        bt_jax.from_pretrained(tmp_path / "jax")

    message = str(raised.value)
    assert str(tmp_path / "jax" / "params") in message
    assert "no Orbax checkpoint metadata" in message
    assert "Re-create it" in message


# Model inputs.


@pytest.fixture
def batch():
    return {k: jnp.asarray(v) for k, v in make_batch(CONFIG, batch=2).items()}


def test_channels_first_pixels_raise(model, batch):
    pixels = batch["pixel_values"].transpose(0, 3, 1, 2)

    with pytest.raises(ValueError) as raised:
        model(batch["input_ids"], batch["attention_mask"], pixels)

    message = str(raised.value)
    assert "(2, 3, 32, 32)" in message
    assert "channels-first" in message
    assert "pixel_values.transpose(0, 2, 3, 1)" in message


def test_wrong_image_size_raises(model, batch):
    pixels = jnp.zeros((2, 48, 48, 3), jnp.float32)

    with pytest.raises(ValueError) as raised:
        model(batch["input_ids"], batch["attention_mask"], pixels)

    message = str(raised.value)
    assert "48x48 pixels but the model expects 32x32" in message
    assert "interpolate_pos_encoding=True" in message


def test_uint8_pixels_raise(model, batch):
    pixels = jnp.zeros((2, 32, 32, 3), jnp.uint8)

    with pytest.raises(ValueError) as raised:
        model(batch["input_ids"], batch["attention_mask"], pixels)

    message = str(raised.value)
    assert "dtype uint8" in message
    assert "normalised floats" in message


def test_batch_size_mismatch_raises(model, batch):
    with pytest.raises(ValueError) as raised:
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:1])

    message = str(raised.value)
    assert "1 images but input_ids hold 2 texts" in message
    assert "one image per text" in message


def test_text_too_long_raises(model, batch):
    length = MAX_TEXT_LENGTH + 1
    input_ids = jnp.full((2, length), 5, jnp.int32)

    with pytest.raises(ValueError) as raised:
        model(input_ids, jnp.ones_like(input_ids), batch["pixel_values"])

    message = str(raised.value)
    assert f"{length} tokens" in message
    assert f"at most {MAX_TEXT_LENGTH}" in message
    assert f"truncation=True, max_length={MAX_TEXT_LENGTH}" in message


def test_text_at_max_length_matches_reference(tmp_path):
    source = save_reference(tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path)
    inputs = make_batch(CONFIG, batch=2, length=MAX_TEXT_LENGTH)

    expected = run_torch(source, "model", inputs)
    assert_outputs_close(expected, run_jax(model, "model", inputs), 1e-5)


@pytest.mark.parametrize("token_id", [CONFIG["text_config"]["vocab_size"], -1])
def test_token_id_out_of_vocab_raises(model, batch, token_id):
    input_ids = batch["input_ids"].at[0, 1].set(token_id)

    with pytest.raises(ValueError) as raised:
        model(input_ids, batch["attention_mask"], batch["pixel_values"])

    message = str(raised.value)
    assert f"token id {token_id}" in message
    assert f"[0, {CONFIG['text_config']['vocab_size']})" in message
    assert "use the tokenizer that matches this checkpoint" in message


@pytest.mark.parametrize("token_id", [CONFIG["text_config"]["vocab_size"], -1])
def test_jit_out_of_vocab_id_is_nan(model, batch, token_id):
    graphdef, state = nnx.split(model)
    input_ids = batch["input_ids"].at[0, 1].set(token_id)

    @jax.jit
    def forward(state, input_ids, attention_mask, pixel_values):
        output = nnx.merge(graphdef, state)(input_ids, attention_mask, pixel_values)
        return output.pooler_output

    pooled = forward(state, input_ids, batch["attention_mask"], batch["pixel_values"])

    assert np.isnan(np.asarray(pooled[0])).all()
    assert np.isfinite(np.asarray(pooled[1])).all()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((0, 9), "pass at least one text of at least one token"),
        ((2, 0), "pass at least one text of at least one token"),
    ],
)
def test_empty_text_raises(model, batch, shape, message):
    input_ids = jnp.zeros(shape, jnp.int32)

    with pytest.raises(ValueError, match=message):
        model(input_ids, None, batch["pixel_values"])


def test_image_smaller_than_patch_raises(model, batch):
    pixels = jnp.zeros((2, 8, 8, 3), jnp.float32)

    with pytest.raises(ValueError) as raised:
        model(
            batch["input_ids"],
            batch["attention_mask"],
            pixels,
            interpolate_pos_encoding=True,
        )

    message = str(raised.value)
    assert "8x8 pixels, smaller than one 16x16 patch" in message
    assert "at least 16 pixels per side" in message


@pytest.mark.parametrize("label", [2, -1])
def test_itm_label_out_of_range_raises(tmp_path, batch, label):
    save_reference(tmp_path, head="itm")
    itm, _ = bt_jax.from_pretrained(tmp_path)
    labels = jnp.array([label, 0])

    with pytest.raises(ValueError) as raised:
        itm(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            labels=labels,
        )

    message = str(raised.value)
    assert f"label {label} is outside the 2 classes [0, 2)" in message
    assert "use -100" in message


def test_jit_bad_mlm_label_is_nan(tmp_path, batch):
    save_reference(tmp_path, head="mlm")
    mlm, _ = bt_jax.from_pretrained(tmp_path)
    graphdef, state = nnx.split(mlm)
    labels = jnp.where(batch["attention_mask"] == 1, batch["input_ids"], -100)

    @jax.jit
    def loss(state, labels):
        output = nnx.merge(graphdef, state)(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            labels=labels,
        )
        return output.loss

    assert np.isfinite(float(loss(state, labels)))
    assert np.isnan(
        float(loss(state, labels.at[0, 1].set(CONFIG["text_config"]["vocab_size"])))
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"share_link_tower_layers": "false"},
            "config.share_link_tower_layers='false' is a str",
        ),
        ({"num_hidden_layers": "2"}, "config.num_hidden_layers='2' is a str"),
        (
            {"text_config": {"layer_norm_eps": "1e-5"}},
            "text_config.layer_norm_eps='1e-5'",
        ),
        (
            {"vision_config": {"hidden_size": 64.0}},
            "vision_config.hidden_size=64.0 is a float",
        ),
    ],
)
def test_config_value_of_wrong_type_raises(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BridgeTowerConfig.from_dict(tiny_config(**overrides))


def test_damaged_parameter_data_raises(tmp_path, model):
    bt_jax.save_pretrained(model, nnx.state(model, nnx.Param), tmp_path / "jax")
    data = tmp_path / "jax" / "params" / "ocdbt.process_0" / "d"
    largest = max(data.iterdir(), key=lambda path: path.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)

    with pytest.raises(ValueError) as raised:
        bt_jax.from_pretrained(tmp_path / "jax")

    message = str(raised.value)
    assert "cannot read the parameter data" in message
    assert "damaged or incomplete" in message
    assert "TensorStore({" not in message


# Command line and atomic output directories.


def test_convert_damaged_parameter_data_fails(tmp_path, model):
    bt_jax.save_pretrained(model, nnx.state(model, nnx.Param), tmp_path / "jax")
    data = tmp_path / "jax" / "params" / "ocdbt.process_0" / "d"
    largest = max(data.iterdir(), key=lambda path: path.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)

    result = run_convert("to-torch", tmp_path / "jax", tmp_path / "out")

    assert result.returncode == 2
    assert "error: cannot read the parameter data" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("init-random", "--config", "configs/base.py", "--head", "itc"),
            "--head itc needs",
        ),
        (("verify", "SRC", "--image-size", "8"), "--image-size 8 is smaller than one"),
        (("verify", "SRC", "--atol", "-1"), "--atol must be a non-negative number"),
    ],
)
def test_convert_invalid_arguments_fail(tmp_path, args, message):
    save_reference(tmp_path / "hf")
    args = [str(tmp_path / "hf") if a == "SRC" else a for a in args]
    if args[0] == "init-random":
        args.append(str(tmp_path / "out"))

    result = run_convert(*args)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_truncated_checkpoint_fails(tmp_path):
    save_reference(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    out = tmp_path / "out"

    result = run_convert("to-jax", tmp_path / "hf", out)

    assert result.returncode == 2
    assert f"error: {weights} is not a readable safetensors file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert partial_siblings(out) == []


def test_convert_existing_output_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    # SRC does not exist, so a message about SRC would mean it was read first.
    result = run_convert("to-jax", tmp_path / "absent", out)

    assert result.returncode == 2
    assert f"error: output directory already exists: {out}" in result.stderr
    assert "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "old"


def fail_to_write(*args, **kwargs):
    raise OSError("No space left on device")


def test_convert_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    save_reference(tmp_path / "hf")
    out = tmp_path / "out"
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail_to_write)

    status = convert_main(["to-jax", str(tmp_path / "hf"), str(out)])

    assert status == 2
    assert "error: No space left on device" in capsys.readouterr().err
    assert not out.exists()
    assert partial_siblings(out) == []


def test_failed_overwrite_keeps_old_directory(tmp_path, monkeypatch, model):
    params = nnx.state(model, nnx.Param)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr("bt_jax.hub.write_safetensors", fail_to_write)

    with pytest.raises(OSError, match="No space left on device"):
        bt_jax.save_torch_checkpoint(model, params, out, overwrite=True)

    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert partial_siblings(out) == []


def test_save_pretrained_existing_output_raises(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(FileExistsError) as raised:
        bt_jax.save_pretrained(model, nnx.state(model, nnx.Param), out)

    message = str(raised.value)
    assert str(out) in message
    assert "overwrite=True" in message


def test_attention_implementation_unknown_name():
    from bt_jax.modeling import layers

    with (
        pytest.raises(ValueError, match=r"'flash' is unknown; use one of"),
        layers.attention_implementation("flash"),
    ):
        pass


def test_attention_implementation_reaches_jax():
    # "cudnn" needs a GPU and half-precision inputs, so on CPU float32 tracing
    # must fail inside jax.nn.dot_product_attention; without the context it runs.
    from bt_jax.modeling import layers

    x = jnp.ones((1, 4, 2, 8), jnp.float32)

    def attend(x):
        return layers.dot_product_attention(x, x, x, None, dropout=None, rngs=None)

    with (
        layers.attention_implementation("cudnn"),
        pytest.raises(Exception, match=r"(?i)cudnn|dtype|gpu|cuda"),
    ):
        jax.jit(attend).lower(x)
    assert jax.jit(attend)(x).shape == x.shape

    # A padding mask has no cuDNN layout in jax 0.10, so masked attention keeps
    # the XLA lowering under "cudnn" and traces on any backend.
    mask = jnp.ones((1, 1, 1, 4), bool)

    def attend_masked(x):
        return layers.dot_product_attention(x, x, x, mask, dropout=None, rngs=None)

    with layers.attention_implementation("cudnn"):
        assert jax.jit(attend_masked).lower(x) is not None
