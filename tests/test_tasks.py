"""The VQA, NLVR2 and SNLI-VE heads and their start from a pretrained checkpoint.

The reference is a transformers `BridgeTowerModel` (random weights, saved as a
real checkpoint) followed by the original repository's classifier written in
PyTorch here (Linear, LayerNorm, GELU, Linear) with the bt-jax head's weights.
NLVR2 runs the reference twice, with `image_token_type_idx` 1 and 2, on a
token-type table grown to three rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import (
    make_batch,
    sample_config,
    save_torch_model,
    tiny_config,
    torch_model,
)

from bt_jax import hub, losses, samples
from bt_jax.config import BridgeTowerConfig
from bt_jax.inference import Predictor
from bt_jax.modeling import create_model
from bt_jax.processing import (
    BridgeTowerImageProcessor,
    BridgeTowerProcessor,
    train_tokenizer,
)
from bt_jax.training.tasks import adapt_backbone, finetuning_params, task_config

ATOL = 1e-5
ANSWERS = ["yes", "no", "2", "red", "dog"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A transformers BridgeTowerModel saved as a Hugging Face checkpoint."""
    config = tiny_config()
    model = torch_model(config, "model", seed=7)
    directory = save_torch_model(model, tmp_path_factory.mktemp("backbone"))
    return directory, config, model


def _task_model(directory, task: str, **settings):
    config = task_config(hub.load_config(directory), task, **settings)
    head = task
    params = finetuning_params(directory, config, head, seed=1)
    model = create_model(config, head)
    nnx.update(model, nnx.State(params))
    return model, params


def _torch_classifier(params: dict) -> torch.nn.Sequential:
    """The original's classifier with the bt-jax head's weights."""
    layers = []
    for index in sorted(params):
        weights = params[index]
        if "kernel" in weights:
            kernel = np.asarray(weights["kernel"])
            linear = torch.nn.Linear(*kernel.shape)
            linear.weight.data = torch.from_numpy(kernel.T.copy())
            linear.bias.data = torch.from_numpy(np.asarray(weights["bias"]).copy())
            layers.append(linear)
        else:
            norm = torch.nn.LayerNorm(len(weights["scale"]))
            norm.weight.data = torch.from_numpy(np.asarray(weights["scale"]).copy())
            norm.bias.data = torch.from_numpy(np.asarray(weights["bias"]).copy())
            layers += [norm, torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval()


def _torch_pooled(model, batch, pixels=None, token_type=1):
    pixels = batch["pixel_values"] if pixels is None else pixels
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
            image_token_type_idx=token_type,
        ).pooler_output


def test_vqa_head_matches_reference_logits_and_loss(backbone):
    directory, config, reference = backbone
    model, params = _task_model(directory, "vqa", id2label=ANSWERS)
    batch = make_batch(config, batch=3, empty_row=False)
    targets = np.zeros((3, len(ANSWERS)), np.float32)
    targets[0, 1], targets[1, [2, 4]], targets[2, 0] = 1.0, (0.3, 0.6), 0.9
    output = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
        labels=jnp.asarray(targets),
    )
    classifier = _torch_classifier(params["vqa_classifier"])
    with torch.no_grad():
        expected = classifier(_torch_pooled(reference, batch))
        expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            expected, torch.from_numpy(targets)
        ) * len(ANSWERS)
    np.testing.assert_allclose(output.logits, expected.numpy(), atol=ATOL)
    np.testing.assert_allclose(output.loss, expected_loss.numpy(), atol=ATOL)


def test_snli_ve_one_layer_head_matches_reference(backbone):
    directory, config, reference = backbone
    model, params = _task_model(directory, "snli-ve", head_layers=1)
    assert sorted(params["snli_classifier"]) == [0]
    batch = make_batch(config, batch=3, empty_row=False)
    labels = np.array([2, 0, 1])
    output = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
        labels=jnp.asarray(labels),
    )
    classifier = _torch_classifier(params["snli_classifier"])
    with torch.no_grad():
        expected = classifier(_torch_pooled(reference, batch))
        expected_loss = torch.nn.functional.cross_entropy(
            expected, torch.from_numpy(labels)
        )
    np.testing.assert_allclose(output.logits, expected.numpy(), atol=ATOL)
    np.testing.assert_allclose(output.loss, expected_loss.numpy(), atol=ATOL)


def test_nlvr2_head_matches_reference_with_third_token_type(backbone):
    directory, config, reference = backbone
    model, params = _task_model(directory, "nlvr2", head_hidden_scale=1.5)
    table = np.asarray(params["bridgetower"]["token_type_embeddings"]["embedding"])
    assert table.shape[0] == 3
    np.testing.assert_array_equal(table[2], table[1])
    # Give row 2 values of its own in both models, so a pass that used row 1
    # for the second image would fail.
    row = np.random.default_rng(0).standard_normal(table.shape[1]).astype(np.float32)
    model.bridgetower.token_type_embeddings.embedding[...] = (
        jnp.asarray(table).at[2].set(row)
    )
    grown = torch.nn.Embedding(3, table.shape[1])
    grown.weight.data = torch.from_numpy(np.concatenate([table[:2], row[None]]))
    reference.token_type_embeddings = grown

    batch = make_batch(config, batch=3, empty_row=False)
    second = np.random.default_rng(1).standard_normal(batch["pixel_values"].shape)
    second = second.astype(np.float32)
    labels = np.array([1, 0, 1])
    output = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
        jnp.asarray(second),
        labels=jnp.asarray(labels),
    )
    classifier = _torch_classifier(params["nlvr2_classifier"])
    with torch.no_grad():
        pooled = torch.cat(
            [
                _torch_pooled(reference, batch, token_type=1),
                _torch_pooled(reference, batch, second, token_type=2),
            ],
            dim=-1,
        )
        expected = classifier(pooled)
        expected_loss = torch.nn.functional.cross_entropy(
            expected, torch.from_numpy(labels)
        )
    np.testing.assert_allclose(output.logits, expected.numpy(), atol=ATOL)
    np.testing.assert_allclose(output.loss, expected_loss.numpy(), atol=ATOL)


def test_finetuning_params_resample_positions_like_torch(backbone):
    directory, config, reference = backbone
    size = 2 * config["vision_config"]["image_size"]
    model, _ = _task_model(directory, "vqa", id2label=ANSWERS, image_size=size)
    batch = make_batch(config, batch=2, image_size=size, empty_row=False)
    trace = model.bridgetower.forward_trace(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["pixel_values"]),
    )
    # transformers resamples the same table with the same bicubic kernel
    # (torch.nn.functional.interpolate) on every call.
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            pixel_values=torch.from_numpy(
                batch["pixel_values"].transpose(0, 3, 1, 2).copy()
            ),
            interpolate_pos_encoding=True,
        ).pooler_output
    np.testing.assert_allclose(trace.pooler_output, expected.numpy(), atol=ATOL)


def test_adapt_backbone_grows_token_types():
    config = BridgeTowerConfig.from_dict(tiny_config())
    table = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)
    adapted = adapt_backbone(
        {("bridgetower", "token_type_embeddings", "embedding"): table},
        config,
        config.replace(num_token_types=3),
    )
    np.testing.assert_array_equal(
        adapted[("bridgetower", "token_type_embeddings", "embedding")],
        [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]],
    )


def test_finetuning_params_rejects_another_answer_vocabulary(backbone, tmp_path):
    directory, _, _ = backbone
    model, params = _task_model(directory, "vqa", id2label=ANSWERS)
    saved = tmp_path / "vqa"
    hub.save_pretrained(model, nnx.state(model, nnx.Param), saved)
    config = hub.load_config(saved)
    with pytest.raises(ValueError, match="has 5 classes but the task has 4"):
        finetuning_params(saved, config.replace(id2label=ANSWERS[:4]), "vqa")
    with pytest.raises(ValueError, match="orders its 5 answers differently"):
        finetuning_params(saved, config.replace(id2label=ANSWERS[::-1]), "vqa")
    # The same vocabulary resumes the fine-tuned head.
    resumed = finetuning_params(saved, config, "vqa")
    np.testing.assert_array_equal(
        resumed["vqa_classifier"][3]["kernel"], params["vqa_classifier"][3]["kernel"]
    )


def test_task_heads_reject_bad_configs_and_inputs():
    config = BridgeTowerConfig.from_dict(tiny_config())
    with pytest.raises(ValueError, match="needs its answer vocabulary"):
        create_model(config, "vqa")
    with pytest.raises(ValueError, match="set it to 3"):
        create_model(config, "nlvr2")
    with pytest.raises(ValueError, match="has 2 classes but the snli-ve head has 3"):
        create_model(config.replace(id2label=["a", "b"]), "snli-ve")
    with pytest.raises(ValueError, match="task_head_layers=3"):
        config.replace(task_head_layers=3)
    with pytest.raises(ValueError, match=r"keys must be 0\.\.1 without gaps"):
        config.replace(id2label={"0": "a", "2": "b"})
    model = create_model(config.replace(num_token_types=3), "nlvr2")
    batch = make_batch(tiny_config(), batch=2)
    with pytest.raises(ValueError, match="pass pixel_values_2"):
        model(jnp.asarray(batch["input_ids"]), None, jnp.asarray(batch["pixel_values"]))
    with pytest.raises(ValueError, match="answer vocabulary of the data"):
        losses.vqa_loss(jnp.zeros((2, 5)), jnp.zeros((2, 4)))


@pytest.mark.parametrize("task", ["vqa", "snli-ve", "nlvr2"])
def test_predictor_scores_fine_tuned_heads_like_the_model(task, tmp_path):
    photos = samples.load_samples()[:3]
    texts = ["what is in the picture?", "a photo of coins", "the clock is red"]
    config = BridgeTowerConfig.from_dict(sample_config())
    config = task_config(config, task, id2label=ANSWERS if task == "vqa" else None)
    model = create_model(config, task, seed=5)
    directory = tmp_path / task
    hub.save_pretrained(model, nnx.state(model, nnx.Param), directory)
    captions = [
        caption for photo in samples.load_samples() for caption in photo.captions
    ]
    train_tokenizer(captions, directory, vocab_size=1000)
    BridgeTowerImageProcessor(size=config.vision_config.image_size).save_pretrained(
        directory
    )
    predictor = Predictor.from_pretrained(directory, batch_size=4, progress=False)
    images = [str(photo.path()) for photo in photos]

    # The model run directly on the processor's inputs is the reference.
    processor = BridgeTowerProcessor.from_pretrained(directory)
    inputs = processor(images=images, text=texts, padding=True)
    ids = jnp.asarray(inputs["input_ids"])
    mask = jnp.asarray(inputs["attention_mask"])
    pixels = jnp.asarray(inputs["pixel_values"])
    if task == "vqa":
        logits = np.asarray(model(ids, mask, pixels).logits)
        expected = 1 / (1 + np.exp(-logits))
        answers = predictor.answer(images, texts, top_k=2)
        for row, predictions in zip(expected, answers, strict=True):
            best = np.argsort(-row)[:2]
            assert [p.label for p in predictions] == [ANSWERS[i] for i in best]
            np.testing.assert_allclose(
                [p.probability for p in predictions], row[best], atol=1e-5
            )
    elif task == "snli-ve":
        logits = np.asarray(model(ids, mask, pixels).logits)
        expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        result = predictor.entailment(images, texts)
        for row, probabilities in zip(expected, result, strict=True):
            np.testing.assert_allclose(list(probabilities.values()), row, atol=1e-5)
    else:
        right = images[::-1]
        pixels_2 = jnp.asarray(processor(images=right, text=texts)["pixel_values"])
        logits = np.asarray(model(ids, mask, pixels, pixels_2).logits)
        expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        np.testing.assert_allclose(
            predictor.nlvr2(images, right, texts), expected[:, 1], atol=1e-5
        )
