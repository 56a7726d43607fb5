"""Fine-tuning end to end: every task trains on fixture data in its official format.

Each test builds a dataset from files in the official layout: VQA v2 JSON,
NLVR2 JSON Lines and image pairs, SNLI-VE JSON Lines, and Karpathy's split file
for retrieval. It starts a tiny model from a saved "pretrained" checkpoint at
32 px, fine-tunes it at 48 px (so the position table is resampled), and checks
that the loss falls and that the task's evaluator wrote its JSON result and
table.
"""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import REPO

from bt_jax import hub, processing
from bt_jax.config import BridgeTowerConfig, load_preset
from bt_jax.data import build_dataset
from bt_jax.data.build import build_sample_dataset
from bt_jax.data.vqa import read_answer_list
from bt_jax.modeling import create_model
from bt_jax.samples import load_samples
from bt_jax.training.settings import default_config
from tests.data_fixtures import (
    materialize_photos,
    write_noise_image,
    write_vqa_source,
)
from train.evaluate import build_parser, evaluate
from train.evaluate import main as evaluate_main
from train.loop import train_and_evaluate
from train.memory import estimate

# Compares JAX programs with each other and checks behaviour only.
pytestmark = pytest.mark.fast_compile

STEPS = 24


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tokenizer and a random tiny itm+itc checkpoint at 32 px."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = root / "tokenizer"
    captions = [caption for photo in load_samples() for caption in photo.captions]
    captions += ["is there a dog", "the left image has two dogs", "a man is sleeping"]
    processing.train_tokenizer(captions, tokenizer, vocab_size=300)
    processing.BridgeTowerImageProcessor(size=32).save_pretrained(tokenizer)
    config = load_preset(REPO / "configs" / "tiny.py").to_dict()
    config["num_hidden_layers"] = 1
    config["text_config"]["vocab_size"] = 300
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    config["vision_config"]["image_size"] = 32
    config["contrastive_hidden_size"] = 32
    config["logit_scale_init_value"] = 2.6592
    model_config = BridgeTowerConfig.from_dict(config)
    model = create_model(model_config, "itm+itc", seed=3)
    checkpoint = root / "pretrained"
    hub.save_pretrained(model, nnx.state(model, nnx.Param), checkpoint)
    return {"root": root, "tokenizer": tokenizer, "checkpoint": checkpoint}


def _config(pretrained, task: str, dataset, train_split: str, eval_split: str):
    config = default_config()
    config.task = task
    config.init_from = str(pretrained["checkpoint"])
    config.tokenizer = str(pretrained["tokenizer"])
    config.image_size = 48
    config.total_steps = STEPS
    config.global_batch_size = 4
    config.log_every_steps = 1
    config.mesh_shape = (1, 1, 1)
    config.data.dataset = str(dataset)
    config.data.train_split = train_split
    config.data.eval_split = eval_split
    config.data.max_text_length = 16
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 2
    config.optimizer.lr_mult_head = 5.0
    config.optimizer.lr_mult_cross_modal = 1.0
    config.checkpoint.every_steps = STEPS
    config.eval.every_steps = 0
    config.eval.batch_size = 4
    config.head.hidden_scale = 1.0
    return config


def _train(config, workdir):
    with jax.default_device(jax.devices("cpu")[0]):
        final = train_and_evaluate(config, workdir)
    losses = [
        json.loads(line)["loss"]
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    return final, losses


def _assert_loss_falls(losses, steps=STEPS, factor=0.7):
    assert len(losses) == steps
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < factor * first, f"loss went from {first:.4f} to {last:.4f}: {losses}"


def _eval_result(workdir, task):
    result = json.loads((workdir / "eval" / f"{task}_step{STEPS}.json").read_text())
    table = (workdir / "eval" / f"{task}_step{STEPS}.txt").read_text()
    return result, table


def test_finetune_vqa_loss_falls_and_scores_accuracy(pretrained, tmp_path):
    source = tmp_path / "vqa_source"
    write_vqa_source(source, materialize_photos(tmp_path / "photos"))
    dataset = build_dataset(
        "vqa", source, tmp_path / "data", num_threads=2, min_answer_count=1
    )
    config = _config(pretrained, "vqa", dataset, "train", "val")
    _, losses = _train(config, tmp_path / "run")
    _assert_loss_falls(losses)
    result, table = _eval_result(tmp_path / "run", "vqa")
    assert 0.0 <= result["accuracy"] <= 100.0
    assert result["questions"] > 0
    assert "accuracy" in table
    exported = hub.load_config(tmp_path / "run" / "model")
    assert exported.default_head == "vqa"
    assert exported.vision_config.image_size == 48

    # The same evaluator, run alone on the exported model, scores the same.
    arguments = [
        "--task=vqa",
        f"--model={tmp_path / 'run' / 'model'}",
        f"--dataset={dataset}",
        "--split=val",
        f"--out={tmp_path / 'alone'}",
        "--batch-size=4",
        "--max-text-length=16",
    ]
    assert evaluate_main(arguments) == 0
    alone = json.loads((tmp_path / "alone" / "vqa_val.json").read_text())
    assert alone["accuracy"] == pytest.approx(result["accuracy"])

    # A dataset whose answer vocabulary is not the head's is refused.
    vocab = list(reversed(exported.id2label.values()))
    other = build_dataset(
        "vqa", source, tmp_path / "other", num_threads=2, answer_vocab=vocab
    )
    arguments[2] = f"--dataset={other}"
    with pytest.raises(ValueError, match=r"answer vocabulary .* in another order"):
        evaluate(build_parser().parse_args(arguments))

    # The model's config.json gives its answer list back, for a rebuild.
    assert read_answer_list(tmp_path / "run" / "model") == list(
        exported.id2label.values()
    )

    # The test split has no human answers: only the predictions are written.
    arguments[2] = f"--dataset={dataset}"
    arguments[3] = "--split=test"
    assert evaluate_main(arguments) == 0
    predictions = json.loads(
        (tmp_path / "alone" / "vqa_test_predictions.json").read_text()
    )
    assert {"question_id", "answer"} == set(predictions[0])
    assert all(p["answer"] in exported.id2label.values() for p in predictions)
    assert not (tmp_path / "alone" / "vqa_test.json").exists()

    # A VQA model cannot be scored as another task.
    arguments[0] = "--task=snli-ve"
    with pytest.raises(ValueError, match=r"needs a snli-ve head, but .* holds a vqa"):
        evaluate(build_parser().parse_args(arguments))


@pytest.mark.parametrize(
    "name", ["vqa_base", "vqa_large", "nlvr2_base", "snli_ve_base", "retrieval_base"]
)
def test_finetune_configs_load_and_size_the_step(name, tmp_path):
    spec = importlib.util.spec_from_file_location(
        name, REPO / "configs" / f"finetune_{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    # The tiny model with the patch size of the recipe's model (large: 14).
    model = load_preset(REPO / "configs" / "tiny.py").to_dict()
    model["vision_config"]["patch_size"] = 14 if "large" in name else 16
    (tmp_path / "config.json").write_text(json.dumps(model))
    config.model = str(tmp_path / "config.json")
    config.global_batch_size = 4
    config.mesh_shape = (1, 1, 1)
    result = estimate(config, compile_step=False)
    # The batch is sized at the task's resolution (VQA large: 574 px).
    image = config.image_size
    assert result["batch_bytes"] >= 4 * image * image * 3 * 4


def _write_nlvr2_pairs(root, count: int):
    """Write `count` NLVR2 train pairs in the official layout, one sentence each.

    The fixtures of `tests/data_fixtures.py` give the texts of one image (pair)
    different labels, which only the text tells apart. A tiny random model's
    pooled output barely depends on the text, so it would need far more steps
    to fit them; here each image has one label.
    """
    lines = []
    for number in range(count):
        pair = f"train-{number}-0"
        for side in (0, 1):
            write_noise_image(
                root / "images" / "train" / "0" / f"{pair}-img{side}.png",
                seed=2 * number + side,
            )
        label = "True" if number % 2 else "False"
        lines.append(
            {
                "identifier": f"{pair}-0",
                "sentence": f"Sentence {number}.",
                "label": label,
                "directory": 0,
            }
        )
    path = root / "nlvr2" / "data" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_finetune_nlvr2_loss_falls_and_scores_accuracy(pretrained, tmp_path):
    _write_nlvr2_pairs(tmp_path / "nlvr2", 6)
    dataset = build_dataset(
        "nlvr2", tmp_path / "nlvr2", tmp_path / "data", num_threads=2
    )
    config = _config(pretrained, "nlvr2", dataset, "train", "train")
    config.head.dropout = 0.1
    _, losses = _train(config, tmp_path / "run")
    _assert_loss_falls(losses)
    result, _ = _eval_result(tmp_path / "run", "nlvr2")
    assert result["examples"] == 6
    assert 0.0 <= result["accuracy"] <= 100.0
    exported = hub.load_config(tmp_path / "run" / "model")
    assert exported.num_token_types == 3


def _write_snli_ve(root, count: int):
    """Write `count` SNLI-VE train lines in the official layout, one per image."""
    labels = ("entailment", "neutral", "contradiction")
    lines = []
    for number in range(count):
        image_id = f"{1000 + number}"
        write_noise_image(
            root / "flickr30k_images" / f"{image_id}.jpg", seed=number, format="JPEG"
        )
        lines.append(
            {
                "Flickr30K_ID": image_id,
                "sentence2": f"Hypothesis {number}.",
                "gold_label": labels[number % 3],
                "pairID": f"{image_id}.jpg#0r1e",
            }
        )
    (root / "snli_ve_train.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines)
    )


def test_finetune_snli_ve_loss_falls_and_scores_accuracy(pretrained, tmp_path):
    _write_snli_ve(tmp_path / "snli", 6)
    dataset = build_dataset(
        "snli-ve", tmp_path / "snli", tmp_path / "data", num_threads=2
    )
    config = _config(pretrained, "snli-ve", dataset, "train", "train")
    _, losses = _train(config, tmp_path / "run")
    _assert_loss_falls(losses)
    result, _ = _eval_result(tmp_path / "run", "snli-ve")
    assert result["examples"] == 6
    assert 0.0 <= result["accuracy"] <= 100.0


def _write_karpathy_flickr(root, photos_dir):
    """Write every sample photo in Karpathy's Flickr30K split file, all in train."""
    photos = materialize_photos(photos_dir)
    entries = []
    sentence_id = 0
    for index, photo in enumerate(photos.values()):
        filename = f"{index}{photo.suffix}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / filename).write_bytes(photo.path.read_bytes())
        sentences = []
        for caption in photo.captions:
            sentences.append(
                {"raw": caption, "tokens": caption.split(), "sentid": sentence_id}
            )
            sentence_id += 1
        entries.append(
            {
                "filename": filename,
                "imgid": index,
                "split": "train",
                "sentences": sentences,
            }
        )
    (root / "dataset_flickr30k.json").write_text(
        json.dumps({"images": entries, "dataset": "flickr30k"})
    )


def test_finetune_retrieval_loss_falls_and_reranks(pretrained, tmp_path):
    _write_karpathy_flickr(tmp_path / "flickr", tmp_path / "photos")
    dataset = build_dataset(
        "karpathy", tmp_path / "flickr", tmp_path / "data", num_threads=2
    )
    config = _config(pretrained, "retrieval", dataset, "train", "train")
    config.objective.mlm_weight = 0.0
    # ITC and ITM start near chance on the tiny model (ln 4 + 0.64 at batch 4)
    # and need more steps than the classifiers to move.
    config.optimizer.learning_rate = 1e-3
    config.global_batch_size = 8
    config.total_steps = 80
    config.checkpoint.every_steps = 80
    config.eval.k_test = 4
    _, losses = _train(config, tmp_path / "run")
    _assert_loss_falls(losses, steps=80, factor=0.9)
    result = json.loads(
        (tmp_path / "run" / "eval" / "retrieval_step80.json").read_text()
    )
    for key in ("text_to_image_r1", "image_to_text_r10", "r_mean"):
        assert 0.0 <= result[key] <= 100.0
    assert result["images"] == 15


def test_finetune_vqa_rejects_a_captions_dataset(pretrained, tmp_path):
    dataset = build_sample_dataset(tmp_path / "data")
    config = _config(pretrained, "vqa", dataset, "train", "")
    with pytest.raises(ValueError, match="task=vqa trains on a vqa dataset"):
        train_and_evaluate(config, tmp_path / "run")
