"""`python -m convert to-jax` on original microsoft/BridgeTower Lightning checkpoints.

No original file is available offline, so each test builds one. It takes random
transformers models of the tiny preset and renames their state dicts to the
original repository's module names with this file's own table. It adds the CLIP
text-tower leftovers, a `temperature` and the run's hyper-parameters, and saves
the result with `torch.save` as a `.ckpt`. The conversion must give exactly the
parameters that converting the Hugging Face save of the same weights gives, and
outputs that match the PyTorch reference.
"""

from __future__ import annotations

import json
import math
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import bt_jax
from bt_jax.config import TASK_HEADS, BridgeTowerConfig, load_preset
from bt_jax.weights import original
from bt_jax.weights.io import CheckpointFileError, write_safetensors
from bt_jax.weights.mapping import CheckpointMismatchError
from convert import __main__ as cli
from convert import commands
from tests.helpers import (
    REPO,
    assert_outputs_close,
    make_batch,
    run_convert,
    run_jax,
    run_torch,
    tiny_config,
    torch_model,
)

ATOL = 1e-5
TEMPERATURE = 0.05

# Hugging Face key -> original key, in the order the prefixes are tried. Written
# from the original repository's module names (`BTTransformer.text_transformer`
# is a RobertaModel, `vit_model` a CLIP model whose `visual` tower names the
# patch convolution `conv1`), independently of bt_jax.weights.original.
HF_TO_ORIGINAL = (
    ("text_model.", "text_transformer."),
    (
        "vision_model.visual.embeddings.patch_embedding.weight",
        "vit_model.visual.conv1.weight",
    ),
    (
        "vision_model.visual.embeddings.class_embedding",
        "vit_model.visual.class_embedding",
    ),
    (
        "vision_model.visual.embeddings.position_embedding.weight",
        "vit_model.visual.positional_embedding",
    ),
    ("vision_model.visual.", "vit_model.visual."),
)


def original_key(hf_key: str) -> str:
    key = hf_key.removeprefix("bridgetower.")
    for hf_prefix, original_prefix in HF_TO_ORIGINAL:
        if key.startswith(hf_prefix):
            return original_prefix + key[len(hf_prefix) :]
    return key


def run_settings(**overrides) -> dict:
    """Hyper-parameters of the tiny preset in the original's `src/config.py` keys.

    The backbones are named by path, as the original allows for a CLIP file and a
    RoBERTa folder, so their sizes come from the weights.
    """
    settings = {
        "model_type": "BT",
        "vit": "/models/clip-tiny.pt",
        "tokenizer": "/models/roberta-tiny",
        "image_size": 32,
        "patch_size": 16,
        "hidden_size": 64,
        "num_heads": 4,
        "num_layers": 2,
        "mlp_ratio": 2,
        "vocab_size": 99,
        "max_text_len": 40,
        "drop_rate": 0.1,
        "input_text_embed_size": 64,
        "input_image_embed_size": 64,
        "vit_layernorm_shared": True,
        "vit_layernorm_init_from_vit": False,
        "vit_remove_last": False,
        "loss_names": {"itm": 1, "mlm": 1, "itc": 0, "vqa": 0, "nlvr2": 0, "snli": 0},
        "temperature": 0.07,
        "contrastive_hidden_size": 16,
        "task_head_layers": 2,
        "head_hidden_scale": 2,
        "vqav2_label_size": 3129,
        "nlvr2_drop_rate": 0.1,
    }
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random MLM, ITM and ITC models on one backbone, and their Hugging Face save."""
    root = tmp_path_factory.mktemp("original")
    config = tiny_config()
    itc = torch_model(config, "itc")
    state = {k: v.numpy().copy() for k, v in itc.state_dict().items()}
    for seed, head in ((10, "itm"), (20, "mlm")):
        other = torch_model(config, head, seed=seed)
        for key, value in other.state_dict().items():
            if not key.startswith("bridgetower."):
                state[key] = value.numpy().copy()
    # ln(1 / temperature) of the float32 temperature the .ckpt stores, so that
    # both conversions hold the same float32 value.
    temperature = float(np.float32(TEMPERATURE))
    state["logit_scale"] = np.asarray(math.log(1 / temperature), np.float32)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    itc.config.save_pretrained(hf_dir)
    write_safetensors(state, hf_dir / "model.safetensors")
    return {"root": root, "config": config, "hf_dir": hf_dir, "state": state}


def original_state(state: dict, heads=("mlm", "itm")) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict as the original saves it, with its extras."""
    prefixes = {"mlm": "mlm_score.", "itm": "itm_score.", "itc": "itc_"}
    result = {}
    for key, value in state.items():
        head = next((h for h, p in prefixes.items() if key.startswith(p)), None)
        if key == "logit_scale" or (head is not None and head not in heads):
            continue
        if key.startswith("itc_cross_modal_head."):
            continue  # the original has text and image ITC heads only
        result[original_key(key)] = torch.from_numpy(np.array(value))
    result["temperature"] = torch.tensor(TEMPERATURE)
    # CLIP text-tower leftovers and RoBERTa's position-id buffer.
    result["vit_model.positional_embedding"] = torch.randn(77, 64)
    result["vit_model.ln_final.weight"] = torch.ones(64)
    result["vit_model.ln_final.bias"] = torch.zeros(64)
    result["text_transformer.embeddings.position_ids"] = torch.arange(64)[None]
    return result


def save_ckpt(path, state, settings=None):
    """Write a Lightning-style checkpoint, with `settings` as hyper-parameters."""
    checkpoint = {
        "epoch": 9,
        "global_step": 1000,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": state,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}],
    }
    if settings is not None:
        checkpoint["hyper_parameters"] = {"config": settings}
    torch.save(checkpoint, path)
    return path


def convert(src, out, *options):
    argv = ["to-jax", src, out, *options]
    args = cli.build_parser().parse_args([str(arg) for arg in argv])
    commands.to_jax(args)
    return out


def flat_params(directory) -> dict[str, np.ndarray]:
    _, params = bt_jax.from_pretrained(directory, param_dtype=None)
    return {
        ".".join(map(str, path)): np.asarray(value.get_value())
        for path, value in nnx.to_flat_state(params)
    }


@pytest.fixture(scope="module")
def hf_converted(weights):
    """to-jax of the Hugging Face save, with and without the ITC head."""
    root, hf_dir = weights["root"], weights["hf_dir"]
    return {
        "mlm+itm": flat_params(
            convert(hf_dir, root / "hf-mlm-itm", "--head", "mlm+itm")
        ),
        "mlm+itm+itc": flat_params(convert(hf_dir, root / "hf-all")),
    }


@pytest.fixture(scope="module")
def pretrained(weights):
    """An MLM+ITM pretraining .ckpt (the layout of the released ones), converted."""
    root = weights["root"]
    ckpt = save_ckpt(root / "pt.ckpt", original_state(weights["state"]), run_settings())
    return convert(ckpt, root / "pt-jax")


def test_pretrained_ckpt_equals_hf_conversion(pretrained, hf_converted):
    expected = hf_converted["mlm+itm"]
    actual = flat_params(pretrained)

    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert np.array_equal(actual[name], value), name


@pytest.mark.parametrize("head", ["mlm", "itm"])
def test_pretrained_ckpt_matches_reference(weights, pretrained, head):
    cls = getattr(transformers, bt_jax.config.HEAD_ARCHITECTURES[head])
    reference = cls.from_pretrained(weights["hf_dir"]).eval()
    model, _ = bt_jax.from_pretrained(pretrained, head=head)
    batch = make_batch(weights["config"], batch=3, length=9)

    assert_outputs_close(
        run_torch(reference, head, batch), run_jax(model, head, batch), ATOL
    )


def test_pretrained_ckpt_head_follows_loss_names(pretrained):
    model, _ = bt_jax.from_pretrained(pretrained)

    assert bt_jax.hub.head_of(model) == "mlm+itm"


def test_itc_ckpt_needs_init_missing_heads(weights, tmp_path):
    state = original_state(weights["state"], heads=("mlm", "itm", "itc"))
    settings = run_settings(loss_names={"mlm": 1, "itm": 1, "itc": 1})
    ckpt = save_ckpt(tmp_path / "itc.ckpt", state, settings)

    with pytest.raises(ValueError, match="itc_cross_modal_head") as error:
        convert(ckpt, tmp_path / "out")

    assert "--init-missing-heads" in str(error.value)
    assert "--head mlm+itm" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_itc_ckpt_converts_with_random_cross_head(weights, hf_converted, tmp_path):
    state = original_state(weights["state"], heads=("mlm", "itm", "itc"))
    settings = run_settings(loss_names={"mlm": 1, "itm": 1, "itc": 1})
    ckpt = save_ckpt(tmp_path / "itc.ckpt", state, settings)
    out = convert(ckpt, tmp_path / "out", "--init-missing-heads")
    expected = hf_converted["mlm+itm+itc"]
    actual = flat_params(out)

    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if not name.startswith("itc_cross_modal_head."):
            assert np.array_equal(actual[name], value), name
    assert math.isclose(
        float(actual["logit_scale"]), math.log(1 / TEMPERATURE), rel_tol=1e-6
    )
    model, _ = bt_jax.from_pretrained(out)
    assert model.config.contrastive_hidden_size == 16


def test_ckpt_without_hyperparameters_needs_config(weights, tmp_path):
    ckpt = save_ckpt(tmp_path / "bare.ckpt", original_state(weights["state"]))

    completed = run_convert("to-jax", ckpt, tmp_path / "out")

    assert completed.returncode == 2
    assert "no hyper-parameters" in completed.stderr
    assert "--config" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_ckpt_without_hyperparameters_uses_config(weights, hf_converted, tmp_path):
    ckpt = save_ckpt(tmp_path / "bare.ckpt", original_state(weights["state"]))
    config_file = tmp_path / "config.json"
    BridgeTowerConfig.from_dict(weights["config"]).to_json_file(config_file)

    out = convert(ckpt, tmp_path / "out", "--config", config_file)
    actual = flat_params(out)

    # Without loss_names the head follows the stored heads: MLM and ITM.
    assert sorted(actual) == sorted(hf_converted["mlm+itm"])
    for name, value in hf_converted["mlm+itm"].items():
        assert np.array_equal(actual[name], value), name


def test_ckpt_directory_with_one_file(weights, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_ckpt(folder / "last.ckpt", original_state(weights["state"]), run_settings())

    out = convert(folder, tmp_path / "out")

    assert (out / "params").is_dir()


def test_unknown_key_raises(weights, tmp_path):
    state = original_state(weights["state"])
    state["vit_model.visual.proj"] = torch.zeros(64, 16)
    ckpt = save_ckpt(tmp_path / "bad.ckpt", state, run_settings())

    with pytest.raises(CheckpointMismatchError, match=r"vit_model\.visual\.proj"):
        convert(ckpt, tmp_path / "out")


def test_missing_key_raises(weights, tmp_path):
    state = original_state(weights["state"])
    del state["cross_modal_text_pooler.dense.weight"]
    ckpt = save_ckpt(tmp_path / "bad.ckpt", state, run_settings())

    with pytest.raises(CheckpointMismatchError) as error:
        convert(ckpt, tmp_path / "out")

    assert "missing" in str(error.value)
    assert "cross_modal_text_pooler.dense.weight" in str(error.value)
    assert str(ckpt) in str(error.value)
    assert sorted(tmp_path.iterdir()) == [ckpt]  # no output, no scratch directory


def vqa_classifier(outputs: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """A random two-layer VQA head of the tiny preset (hidden 64, scale 2)."""
    generator = torch.Generator().manual_seed(seed)
    width = 2 * 64 * 2
    # Scaled like trained weights, so that logits stay near 1 and float32
    # rounding stays below the tolerance.
    return {
        "vqa_classifier.0.weight": 0.1 * torch.randn(width, 128, generator=generator),
        "vqa_classifier.0.bias": 0.1 * torch.randn(width, generator=generator),
        "vqa_classifier.1.weight": 1 + 0.1 * torch.randn(width, generator=generator),
        "vqa_classifier.1.bias": 0.1 * torch.randn(width, generator=generator),
        "vqa_classifier.3.weight": 0.1
        * torch.randn(outputs, width, generator=generator),
        "vqa_classifier.3.bias": 0.1 * torch.randn(outputs, generator=generator),
    }


def vqa_ckpt(weights, path, outputs=7):
    state = original_state(weights["state"], heads=())
    state.update(vqa_classifier(outputs))
    settings = run_settings(
        loss_names={"vqa": 1, "mlm": 0, "itm": 0}, vqav2_label_size=outputs
    )
    return save_ckpt(path, state, settings), state


def test_undeclared_task_head_raises(weights, tmp_path):
    state = original_state(weights["state"])
    state.update(vqa_classifier(7))
    ckpt = save_ckpt(tmp_path / "bad.ckpt", state, run_settings())

    with pytest.raises(CheckpointMismatchError, match="vqa_classifier") as error:
        convert(ckpt, tmp_path / "out")

    assert "loss_names" in str(error.value)
    assert "--head vqa" in str(error.value)


def test_head_option_must_declare_task_head(weights, tmp_path):
    ckpt, _ = vqa_ckpt(weights, tmp_path / "vqa.ckpt")

    with pytest.raises(CheckpointMismatchError, match="--head itm"):
        convert(ckpt, tmp_path / "out", "--head", "itm")


def test_rank_output_is_rejected(weights, tmp_path):
    state = original_state(weights["state"])
    state["rank_output.weight"] = torch.zeros(1, 128)
    state["rank_output.bias"] = torch.zeros(1)
    settings = run_settings(loss_names={"itm": 0.5, "irtr": 1})
    ckpt = save_ckpt(tmp_path / "irtr.ckpt", state, settings)

    with pytest.raises(CheckpointMismatchError, match="rank_output") as error:
        convert(ckpt, tmp_path / "out")

    assert "ITM+ITC" in str(error.value)


def test_answer_list_of_wrong_length_raises(weights, tmp_path):
    ckpt, _ = vqa_ckpt(weights, tmp_path / "vqa.ckpt", outputs=7)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", "no", "2"]))

    with pytest.raises(ValueError, match="3 answers") as error:
        convert(ckpt, tmp_path / "out", "--answers", answers)

    assert "7 outputs" in str(error.value)


def test_vqa_ckpt_converts_to_vqa_head(weights, tmp_path):
    ckpt, state = vqa_ckpt(weights, tmp_path / "vqa.ckpt", outputs=7)
    answers = [f"answer text {i}" for i in range(7)]
    (tmp_path / "answers.json").write_text(json.dumps({"label2ans": answers}))

    out = convert(ckpt, tmp_path / "out", "--answers", tmp_path / "answers.json")
    model, _ = bt_jax.from_pretrained(out)
    head = model.vqa_classifier

    assert bt_jax.hub.head_of(model) == "vqa"
    assert model.config.id2label == dict(enumerate(answers))
    assert model.config.task_head_layers == 2
    for index in (0, 3):
        weight = state[f"vqa_classifier.{index}.weight"].numpy()
        bias = state[f"vqa_classifier.{index}.bias"].numpy()
        assert np.array_equal(np.asarray(head[index].kernel[...]), weight.T), index
        assert np.array_equal(np.asarray(head[index].bias[...]), bias), index
    norm_weight = state["vqa_classifier.1.weight"].numpy()
    assert np.array_equal(np.asarray(head[1].scale[...]), norm_weight)


def test_vqa_ckpt_matches_torch_classifier(weights, tmp_path):
    ckpt, state = vqa_ckpt(weights, tmp_path / "vqa.ckpt", outputs=7)
    model, _ = bt_jax.from_pretrained(convert(ckpt, tmp_path / "out"))
    # The reference: transformers' backbone, then the original's classifier.
    backbone = transformers.BridgeTowerModel.from_pretrained(weights["hf_dir"]).eval()
    classifier = torch.nn.Sequential(
        torch.nn.Linear(128, 256),
        torch.nn.LayerNorm(256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 7),
    )
    classifier.load_state_dict(
        {k.removeprefix("vqa_classifier."): v for k, v in state.items() if "vqa" in k}
    )
    batch = make_batch(weights["config"], batch=3, length=9)
    with torch.no_grad():
        pooled = backbone(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(
                batch["pixel_values"].transpose(0, 3, 1, 2).copy()
            ),
        ).pooler_output
        expected = classifier(pooled).numpy()

    logits = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
    ).logits

    assert_outputs_close({"logits": expected}, {"logits": np.asarray(logits)}, ATOL)


def test_nlvr2_ckpt_converts_with_three_token_types(weights, tmp_path):
    state = original_state(weights["state"], heads=())
    types_table = state["token_type_embeddings.weight"]
    state["token_type_embeddings.weight"] = torch.cat([types_table, types_table[1:]])
    width = int(2 * 64 * 1.5)
    generator = torch.Generator().manual_seed(5)
    for index, shape in ((0, (width, 256)), (1, (width,)), (3, (2, width))):
        state[f"nlvr2_classifier.{index}.weight"] = torch.randn(
            *shape, generator=generator
        )
        state[f"nlvr2_classifier.{index}.bias"] = torch.randn(
            shape[0], generator=generator
        )
    settings = run_settings(
        loss_names={"nlvr2": 1}, head_hidden_scale=1.5, nlvr2_drop_rate=0.2
    )
    ckpt = save_ckpt(tmp_path / "nlvr2.ckpt", state, settings)

    model, _ = bt_jax.from_pretrained(convert(ckpt, tmp_path / "out"))
    table = model.bridgetower.token_type_embeddings.embedding[...]

    assert bt_jax.hub.head_of(model) == "nlvr2"
    assert model.config.num_token_types == 3
    assert model.config.id2label == {0: "False", 1: "True"}
    assert model.config.head_dropout == 0.2
    assert np.array_equal(np.asarray(table), state["token_type_embeddings.weight"])
    kernel = model.nlvr2_classifier[3].kernel[...]
    assert np.array_equal(np.asarray(kernel), state["nlvr2_classifier.3.weight"].T)


def released_settings(size: str) -> dict:
    """Hyper-parameters of the original's pretraining scripts for base and large."""
    if size == "base":
        return run_settings(
            vit="CLIP-ViT-B/16",
            tokenizer="roberta-base",
            image_size=288,
            patch_size=16,
            hidden_size=768,
            num_heads=12,
            num_layers=6,
            mlp_ratio=4,
            vocab_size=50265,
            input_text_embed_size=768,
            input_image_embed_size=768,
        )
    return run_settings(
        vit="CLIP-ViT-L/14",
        tokenizer="roberta-large",
        image_size=294,
        patch_size=14,
        hidden_size=1024,
        num_heads=16,
        num_layers=6,
        mlp_ratio=4,
        vocab_size=50265,
        input_text_embed_size=1024,
        input_image_embed_size=1024,
        contrastive_hidden_size=512,
        loss_names={"mlm": 1, "itm": 1, "itc": 1},
    )


@pytest.mark.parametrize("size", ["base", "large"])
def test_config_from_original_equals_preset(size):
    preset = load_preset(REPO / "configs" / f"{size}.py").to_dict()
    derived = original.config_from_original(
        {"config": released_settings(size)}
    ).to_dict()

    for section in ("text_config", "vision_config"):
        for key, value in preset[section].items():
            assert derived[section][key] == value, f"{section}.{key}"
    for key, value in preset.items():
        if key in ("text_config", "vision_config", "logit_scale_init_value"):
            continue
        assert derived[key] == value, key
    if size == "large":
        assert math.isclose(derived["logit_scale_init_value"], 2.6592, abs_tol=1e-4)


def test_config_from_original_rejects_bert():
    settings = released_settings("base")
    settings["tokenizer"] = "bert-base-uncased"

    with pytest.raises(ValueError, match="RoBERTa"):
        original.config_from_original(settings)


def fake_module(monkeypatch, name: str, **members) -> None:
    """Register a module and its parent packages, so that pickle can save members."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = ".".join(parts[:depth])
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    module = types.ModuleType(name)
    for attribute, value in members.items():
        value.__module__ = name
        value.__qualname__ = attribute
        setattr(module, attribute, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_lightning_containers_load_as_plain_dicts(weights, tmp_path, monkeypatch):
    attribute_dict = type("AttributeDict", (dict,), {})

    def reduce_read_only(self):
        return type(self), (dict(self),)

    read_only_dict = type("ReadOnlyDict", (dict,), {"__reduce__": reduce_read_only})
    fake_module(
        monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=attribute_dict
    )
    fake_module(
        monkeypatch, "sacred.config.custom_containers", ReadOnlyDict=read_only_dict
    )
    settings = run_settings()
    checkpoint = {
        "state_dict": original_state(weights["state"]),
        "hyper_parameters": attribute_dict(config=read_only_dict(settings)),
    }
    torch.save(checkpoint, tmp_path / "pl.ckpt")
    monkeypatch.undo()  # loading must not need the classes
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "pl.ckpt")

    loaded = original.load_original_checkpoint(tmp_path / "pl.ckpt")

    # A plain weights-only load would reject both classes.
    assert sorted(unsafe) == [
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "sacred.config.custom_containers.ReadOnlyDict",
    ]
    assert type(loaded.run_config) is dict
    assert loaded.run_config == settings


def test_unknown_class_is_not_unpickled(weights, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"

    def touch(path):
        open(path, "w").close()

    class Payload:
        def __reduce__(self):
            return touch, (str(marker),)

    fake_module(monkeypatch, "untrusted_package", touch=touch, Payload=Payload)
    checkpoint = {
        "state_dict": original_state(weights["state"]),
        "callbacks": {"x": Payload()},
    }
    torch.save(checkpoint, tmp_path / "unsafe.ckpt")

    with pytest.raises(CheckpointFileError, match=r"untrusted_package\.touch"):
        original.load_original_checkpoint(tmp_path / "unsafe.ckpt")

    assert not marker.exists()


def test_is_original_checkpoint(weights, tmp_path):
    state = original_state(weights["state"])
    folder = tmp_path / "run"
    folder.mkdir()
    save_ckpt(folder / "last.ckpt", state)

    assert original.is_original_checkpoint(folder / "last.ckpt")
    assert original.is_original_checkpoint(folder)
    assert original.is_original_checkpoint({"state_dict": state})
    assert not original.is_original_checkpoint(weights["hf_dir"])
    assert not original.is_original_checkpoint(
        load_file(weights["hf_dir"] / "model.safetensors")
    )


def test_original_to_hf_state_dict_reports_dropped_keys(weights):
    state = {k: v.numpy() for k, v in original_state(weights["state"]).items()}

    converted, report = original.original_to_hf_state_dict(state)

    assert sorted(report.dropped) == [
        "text_transformer.embeddings.position_ids",
        "vit_model.ln_final.bias",
        "vit_model.ln_final.weight",
        "vit_model.positional_embedding",
    ]
    assert math.isclose(
        float(converted["logit_scale"]), math.log(1 / TEMPERATURE), rel_tol=1e-6
    )
    assert "text_model.pooler.dense.weight" in converted


def test_cli_help_names_ckpt_options():
    completed = run_convert("to-jax", "--help")

    assert completed.returncode == 0
    for text in ("--config", "--answers", ".ckpt", "snli-ve"):
        assert text in completed.stdout, text


def test_cli_task_heads_match_config():
    assert cli.TASK_HEADS == TASK_HEADS
