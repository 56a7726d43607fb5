"""Checkpoint formats: every weight layout bt-jax reads, the loading rules, and round trips.

Each test writes a real checkpoint from a random transformers model and compares
what bt-jax loads with that model: its outputs at ATOL, or its tensors exactly.
Round trips compare the tensors written back with the ones read, bit for bit.
"""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
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
from bt_jax import sharding
from bt_jax.config import HEAD_ARCHITECTURES, BridgeTowerConfig
from bt_jax.hub import abstract_model, torch_state_dict
from bt_jax.weights.mapping import CheckpointMismatchError

ATOL = 1e-5
CONFIG = tiny_config()


@functools.cache
def reference(head: str, seed: int = 0) -> torch.nn.Module:
    """Return a cached random reference model; copy it before changing it."""
    return torch_model(CONFIG, head, seed=seed)


def assert_parity(reference_model, head, model):
    batch = make_batch(CONFIG)
    expected = run_torch(reference_model, head, batch)
    assert_outputs_close(expected, run_jax(model, head, batch), ATOL)


def save_config(source: torch.nn.Module, directory) -> None:
    """Write config.json naming the class of `source`, as `save_pretrained` does."""
    config = copy.deepcopy(source.config)
    config.architectures = [type(source).__name__]
    config.save_pretrained(directory)


def save_state_dict(state, source, directory):
    """Write `state` as model.safetensors, with the config.json of `source`."""
    directory.mkdir()
    save_config(source, directory)
    safetensors.torch.save_file(
        state, directory / "model.safetensors", metadata={"format": "pt"}
    )
    return directory


def flat_params(params) -> dict[str, object]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Return the bytes of `tensor`, so that equal bytes mean equal bits in any dtype."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


# Weight file layouts.


def test_load_safetensors(tmp_path):
    source = reference("itm")
    source.save_pretrained(tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path)

    assert_parity(source, "itm", model)


def test_load_sharded_safetensors(tmp_path):
    source = reference("itm")
    source.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()

    model, _ = bt_jax.from_pretrained(tmp_path)

    assert_parity(source, "itm", model)


def test_load_bin(tmp_path):
    source = reference("itm")
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    save_config(source, tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path)

    assert_parity(source, "itm", model)


def test_load_sharded_bin(tmp_path):
    source = reference("itm")
    state = source.state_dict()
    keys = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, shard_keys in halves.items():
        torch.save({k: state[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    save_config(source, tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path)

    assert_parity(source, "itm", model)


def test_load_legacy_format_bin(tmp_path):
    source = reference("itm")
    torch.save(
        source.state_dict(),
        tmp_path / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
    )
    save_config(source, tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path)

    assert_parity(source, "itm", model)


# Half-precision stored weights.


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"]
)
def test_load_half_precision_as_float32(tmp_path, dtype):
    source = copy.deepcopy(reference("model")).to(dtype)
    source.save_pretrained(tmp_path)
    model, params = bt_jax.from_pretrained(tmp_path)

    dtypes = {str(v.dtype) for v in flat_params(params).values()}
    assert dtypes == {"float32"}
    loaded = torch_state_dict(model, params)
    stored = source.state_dict()
    assert sorted(loaded) == sorted(stored)
    differ = [
        k for k in stored if not np.array_equal(loaded[k], stored[k].float().numpy())
    ]
    assert not differ, f"values differ from the stored ones: {differ}"


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"]
)
def test_load_half_precision_keeps_dtype(tmp_path, dtype, file_format):
    source = copy.deepcopy(reference("model")).to(dtype)
    if file_format == "bin":
        torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
        save_config(source, tmp_path)
    else:
        source.save_pretrained(tmp_path)
    model, params = bt_jax.from_pretrained(tmp_path, param_dtype=None)

    dtypes = {str(v.dtype) for v in flat_params(params).values()}
    assert dtypes == {str(dtype).removeprefix("torch.")}
    loaded = torch_state_dict(model, params)
    stored = source.state_dict()
    # Widening float16 and bfloat16 to float32 is exact, so equal float32 values
    # mean equal stored bits.
    differ = [
        k
        for k in stored
        if not np.array_equal(
            np.asarray(loaded[k], np.float32), stored[k].float().numpy()
        )
    ]
    assert not differ, f"values differ from the stored ones: {differ}"


# Loading rules of bt_jax.weights.mapping.


def test_load_drops_legacy_buffers(tmp_path):
    source = reference("model")
    text = CONFIG["text_config"]
    vision = CONFIG["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    state = dict(source.state_dict())
    positions = text["max_position_embeddings"]
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    state["text_model.embeddings.token_type_ids"] = torch.zeros(
        (1, positions), dtype=torch.int64
    )
    state["vision_model.visual.embeddings.position_ids"] = torch.arange(patches + 1)[
        None
    ]
    save_state_dict(state, source, tmp_path / "hf")
    model, _ = bt_jax.from_pretrained(tmp_path / "hf")

    assert_parity(source, "model", model)


def test_load_drops_prefixed_legacy_buffers(tmp_path):
    source = reference("itm")
    positions = CONFIG["text_config"]["max_position_embeddings"]
    state = dict(source.state_dict())
    state["bridgetower.text_model.embeddings.position_ids"] = torch.arange(positions)[
        None
    ]
    state["bridgetower.text_model.embeddings.token_type_ids"] = torch.zeros(
        (1, positions), dtype=torch.int64
    )
    save_state_dict(state, source, tmp_path / "hf")
    model, _ = bt_jax.from_pretrained(tmp_path / "hf")

    assert_parity(source, "itm", model)


def test_load_model_checkpoint_as_model(tmp_path):
    source = reference("model")
    source.save_pretrained(tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path, head="model")

    assert_parity(source, "model", model)


def test_load_mlm_checkpoint_as_model(tmp_path):
    source = reference("mlm")
    source.save_pretrained(tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path, head="model")

    assert_parity(source.bridgetower, "model", model)


def test_load_all_heads_checkpoint_as_itc(tmp_path):
    source = reference("itc")
    state = dict(source.state_dict())
    # Hub checkpoints carry MLM and ITM heads next to the ITC ones.
    for head, prefix in (("mlm", "mlm_score."), ("itm", "itm_score.")):
        extra = {
            k: v
            for k, v in reference(head, seed=1).state_dict().items()
            if k.startswith(prefix)
        }
        assert extra, f"no {prefix} tensors in the {head} reference"
        state.update(extra)
    save_state_dict(state, source, tmp_path / "hf")
    model, _ = bt_jax.from_pretrained(tmp_path / "hf", head="itc")

    assert_parity(source, "itc", model)


def test_load_model_checkpoint_as_itm_raises(tmp_path):
    reference("model").save_pretrained(tmp_path)

    with pytest.raises(CheckpointMismatchError) as raised:
        bt_jax.from_pretrained(tmp_path, head="itm")

    message = str(raised.value)
    assert "itm_score.fc.weight [2, 128]" in message
    assert "init_missing_heads=True" in message


def test_load_model_checkpoint_as_itm_init_missing(tmp_path):
    source = reference("model")
    source.save_pretrained(tmp_path)
    model, _ = bt_jax.from_pretrained(tmp_path, head="itm", init_missing_heads=True)
    batch = make_batch(CONFIG)
    expected = run_torch(source, "model", batch)["pooler_output"]
    output = model.bridgetower(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    )
    pooled = np.asarray(output.pooler_output)

    assert pooled.shape == expected.shape
    np.testing.assert_allclose(pooled, expected, rtol=0, atol=ATOL)


# Round trips.

ROUND_TRIPS = [
    pytest.param("itm", torch.float32, id="itm-float32"),
    pytest.param("mlm", torch.bfloat16, id="mlm-bfloat16"),
    pytest.param("model", torch.float16, id="model-float16"),
    pytest.param("itc", torch.float32, id="itc-float32"),
]


@pytest.mark.parametrize(("head", "dtype"), ROUND_TRIPS)
def test_convert_round_trip(tmp_path, head, dtype):
    source = copy.deepcopy(reference(head)).to(dtype)
    source.save_pretrained(tmp_path / "hf")

    to_jax = run_convert("to-jax", tmp_path / "hf", tmp_path / "jax")
    assert to_jax.returncode == 0, to_jax.stderr
    to_torch = run_convert("to-torch", tmp_path / "jax", tmp_path / "out")
    assert to_torch.returncode == 0, to_torch.stderr

    written = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    original = source.state_dict()
    assert sorted(written) == sorted(original)
    wrong_dtype = [k for k in original if written[k].dtype != original[k].dtype]
    assert not wrong_dtype, f"dtype changed: {wrong_dtype}"
    wrong_shape = [k for k in original if written[k].shape != original[k].shape]
    assert not wrong_shape, f"shape changed: {wrong_shape}"
    differ = [
        k
        for k in original
        if not np.array_equal(raw_bytes(written[k]), raw_bytes(original[k]))
    ]
    assert not differ, f"bits changed: {differ}"

    torch_class = getattr(transformers, HEAD_ARCHITECTURES[head])
    _, info = torch_class.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_torch_state_dict_keeps_scalar_shape(tmp_path):
    reference("itc").save_pretrained(tmp_path)
    model, params = bt_jax.from_pretrained(tmp_path)

    assert torch_state_dict(model, params)["logit_scale"].shape == ()


def test_save_pretrained_round_trip(tmp_path):
    source = copy.deepcopy(reference("itc")).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "hf")
    model, params = bt_jax.from_pretrained(tmp_path / "hf", param_dtype=None)
    bt_jax.save_pretrained(model, params, tmp_path / "jax")
    _, reloaded = bt_jax.from_pretrained(tmp_path / "jax", param_dtype=None)

    before, after = flat_params(params), flat_params(reloaded)
    assert sorted(after) == sorted(before)
    wrong_dtype = [k for k in before if after[k].dtype != before[k].dtype]
    assert not wrong_dtype, f"dtype changed: {wrong_dtype}"
    differ = [
        k
        for k in before
        if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))
    ]
    assert not differ, f"values changed: {differ}"


def test_tied_decoder_round_trip(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    source = torch_model(config, "mlm")
    source.save_pretrained(tmp_path / "hf")
    model, params = bt_jax.from_pretrained(tmp_path / "hf")
    bt_jax.save_torch_checkpoint(model, params, tmp_path / "out")
    loaded, info = transformers.BridgeTowerForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    batch = make_batch(config)

    assert model.mlm_score.decoder is None
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert_outputs_close(
        run_torch(source, "mlm", batch), run_torch(loaded, "mlm", batch), 0.0
    )


def test_abstract_model_new_module_per_call():
    config = BridgeTowerConfig.from_dict(CONFIG)
    first = abstract_model(config, "itm")
    second = abstract_model(config, "itm")
    assert first is not second
    # Loading writes arrays into the abstract model; later calls stay abstract.
    dense = first.bridgetower.text_model.encoder.layer[0].intermediate.dense
    dense.kernel.set_value(jnp.zeros(dense.kernel.shape))
    later = abstract_model(config, "itm").bridgetower.text_model.encoder.layer[0]
    assert isinstance(later.intermediate.dense.kernel.get_value(), jax.ShapeDtypeStruct)


def test_abstract_model_follows_config_and_dtype():
    config = BridgeTowerConfig.from_dict(CONFIG)
    abstract_model(config, "itm")
    wider = BridgeTowerConfig.from_dict(
        tiny_config(text_config={"intermediate_size": 96})
    )
    for model_config, dtype, width in (
        (wider, "float32", 96),
        (config, "bfloat16", 128),
    ):
        model = abstract_model(model_config, "itm", param_dtype=jnp.dtype(dtype))
        kernel = model.bridgetower.text_model.encoder.layer[0].intermediate.dense.kernel
        assert kernel.shape == (CONFIG["text_config"]["hidden_size"], width)
        assert kernel.dtype == jnp.dtype(dtype)


def test_abstract_model_under_mesh_carries_shardings():
    config = BridgeTowerConfig.from_dict(CONFIG)

    def kernel(model):
        layer = model.bridgetower.text_model.encoder.layer[0]
        return layer.intermediate.dense.kernel.get_value()

    assert kernel(abstract_model(config, "itm")).sharding is None
    mesh = sharding.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(list(sharding.DEFAULT_RULES)):
        assert kernel(abstract_model(config, "itm")).sharding is not None
    assert kernel(abstract_model(config, "itm")).sharding is None
