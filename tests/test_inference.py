"""The Predictor API against the PyTorch reference, and its reuse of compiled code.

The checkpoint stores the MLM, ITM and ITC heads on one perturbed random
backbone, with a tokenizer trained on the sample captions and 64 px
preprocessing. The reference side preprocesses with transformers' own
processor and runs transformers' head classes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_utils import load_image as reference_load_image
from transformers.models.bridgetower.image_processing_pil_bridgetower import (
    BridgeTowerImageProcessorPil,
)

from bt_jax import samples
from bt_jax.inference import Gallery, Predictor, bucket_size
from bt_jax.processing import BridgeTowerImageProcessor, train_tokenizer
from tests.helpers import sample_config, save_multihead_checkpoint

IMAGE_SIZE = 64
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Spreads the random ITM scores apart; see save_multihead_checkpoint.
ITM_SCALE = 40.0


@pytest.fixture(scope="module")
def photos():
    return samples.load_samples()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photos):
    directory = tmp_path_factory.mktemp("predictor")
    models = save_multihead_checkpoint(
        directory, sample_config(), seed=3, itm_scale=ITM_SCALE
    )
    captions = [caption for photo in photos for caption in photo.captions]
    train_tokenizer(captions, directory, vocab_size=1000)
    BridgeTowerImageProcessor(size=IMAGE_SIZE).save_pretrained(directory)
    return directory, models


@pytest.fixture(scope="module")
def predictor(checkpoint):
    directory, _ = checkpoint
    return Predictor.from_pretrained(directory, batch_size=8, progress=False)


@pytest.fixture
def fresh_predictor(checkpoint):
    """A predictor with no compiled code yet, for counting compilations."""
    directory, _ = checkpoint
    return Predictor.from_pretrained(directory, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def reference_processor(checkpoint):
    directory, _ = checkpoint
    size = {"shortest_edge": IMAGE_SIZE}
    return transformers.BridgeTowerProcessor(
        image_processor=BridgeTowerImageProcessorPil(size=size, crop_size=size),
        tokenizer=transformers.RobertaTokenizerFast.from_pretrained(directory),
    )


def reference_inputs(processor, images, texts):
    pil = [reference_load_image(str(image)) for image in images]
    encoded = processor(images=pil, text=texts, padding=True, return_tensors="pt")
    return {
        key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values")
    }


def reference_itm_logits(models, processor, images, texts) -> np.ndarray:
    with torch.no_grad():
        output = models["itm"](**reference_inputs(processor, images, texts))
    return output.logits.numpy()


def reference_embeddings(models, processor, images, texts):
    """ITC image and text embeddings of the reference, each from its own modality.

    The reference only embeds pairs. Its text and image embeddings do not depend
    on the other half of the pair, so texts are paired with the first image and
    images with the first text.
    """
    with torch.no_grad():
        by_image = models["itc"](
            **reference_inputs(processor, images, [texts[0]] * len(images))
        )
        by_text = models["itc"](
            **reference_inputs(processor, [images[0]] * len(texts), texts)
        )
    return by_image.image_embeds.numpy(), by_text.text_embeds.numpy()


def reference_ranking(models, processor, queries, items, k, candidates, *, by_image):
    """Contrastive shortlist then ITM re-ranking, computed with transformers."""
    images, texts = (queries, items) if by_image else (items, queries)
    image_embeds, text_embeds = reference_embeddings(models, processor, images, texts)
    similarity = image_embeds @ text_embeds.T
    if not by_image:
        similarity = similarity.T
    shortlist = np.argsort(-similarity, axis=1, kind="stable")[:, :candidates]
    rankings, scores = [], []
    for q, row in enumerate(shortlist):
        pair_items = [items[i] for i in row]
        pair_queries = [queries[q]] * len(row)
        logits = (
            reference_itm_logits(models, processor, pair_queries, pair_items)
            if by_image
            else reference_itm_logits(models, processor, pair_items, pair_queries)
        )
        order = np.argsort(-logits[:, 1], kind="stable")[:k]
        rankings.append([int(row[i]) for i in order])
        scores.append(np.sort(logits[:, 1])[::-1])
    return rankings, scores


@contextlib.contextmanager
def count_compilations():
    """Count XLA compilations inside the block."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def assert_distinct(scores, gap=1e-4):
    """Fail when two compared scores are too close for float32 ranking to be stable."""
    for row in scores:
        assert np.all(np.abs(np.diff(row)) > gap), (
            "near-tied scores make ranks unstable"
        )


def test_predictor_loads_every_stored_head(predictor):
    assert predictor.heads == ("mlm", "itm", "itc")


def test_match_equals_reference_probabilities(
    predictor, checkpoint, photos, reference_processor
):
    _, models = checkpoint
    images = [photo.path() for photo in photos[:4]]
    texts = [photos[i].captions[0] for i in (0, 1, 3, 2)]
    logits = reference_itm_logits(models, reference_processor, images, texts)
    expected = torch.softmax(torch.from_numpy(logits), -1)[:, 1].numpy()
    np.testing.assert_allclose(predictor.match(images, texts), expected, atol=1e-5)


def test_similarity_equals_reference(
    predictor, checkpoint, photos, reference_processor
):
    _, models = checkpoint
    images = [photo.path() for photo in photos[:3]]
    texts = [photo.captions[1] for photo in photos[:5]]
    image_embeds, text_embeds = reference_embeddings(
        models, reference_processor, images, texts
    )
    np.testing.assert_allclose(
        predictor.similarity(images, texts), image_embeds @ text_embeds.T, atol=1e-5
    )


def test_retrieve_texts_ranking_equals_reference(
    predictor, checkpoint, photos, reference_processor
):
    _, models = checkpoint
    images = [photo.path() for photo in photos]
    texts = [photo.captions[0] for photo in photos]
    expected, scores = reference_ranking(
        models, reference_processor, images, texts, 5, 6, by_image=True
    )
    assert_distinct(scores)
    results = predictor.retrieve_texts(images, texts, k=5, candidates=6)
    assert [[m.index for m in row] for row in results] == expected


def test_retrieve_images_ranking_equals_reference(
    predictor, checkpoint, photos, reference_processor
):
    _, models = checkpoint
    images = [photo.path() for photo in photos]
    texts = [photo.captions[1] for photo in photos]
    expected, scores = reference_ranking(
        models, reference_processor, texts, images, 5, 6, by_image=False
    )
    assert_distinct(scores)
    results = predictor.retrieve_images(texts, images, k=5, candidates=6)
    assert [[m.index for m in row] for row in results] == expected


def test_retrieval_without_rerank_ranks_by_similarity(predictor, photos):
    images = [photo.path() for photo in photos[:6]]
    texts = [photo.captions[2] for photo in photos[:6]]
    similarity = predictor.similarity(images, texts)
    results = predictor.retrieve_texts(images, texts, k=3, rerank=False)
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :3]
    assert [[m.index for m in row] for row in results] == expected.tolist()
    assert results[0][0].match_probability is None


def test_fill_mask_equals_reference_top_k(
    predictor, checkpoint, photos, reference_processor
):
    _, models = checkpoint
    mask = predictor.processor.mask_token
    image = photos[0].path()
    text = f"a photo of a {mask} in a suit"
    predictions = predictor.fill_mask(image, text, top_k=4)
    assert len(predictions) == 1
    assert len(predictions[0]) == 1
    inputs = reference_inputs(reference_processor, [image], [text])
    with torch.no_grad():
        logits = models["mlm"](**inputs).logits[0]
    position = int(
        (inputs["input_ids"][0] == predictor.processor.mask_token_id).nonzero()
    )
    probabilities, token_ids = torch.softmax(logits[position], -1).topk(4)
    options = predictions[0][0]
    assert [p.token_id for p in options] == token_ids.tolist()
    np.testing.assert_allclose(
        [p.probability for p in options], probabilities.numpy(), atol=1e-5
    )


def test_fill_mask_returns_each_mask_in_order(predictor, photos):
    mask = predictor.processor.mask_token
    predictions = predictor.fill_mask(photos[1].path(), f"a {mask} with green {mask}")
    assert len(predictions[0]) == 2
    assert all(len(options) == 5 for options in predictions[0])


def test_match_reuses_compilation_within_bucket(fresh_predictor, photos):
    images = [photo.path() for photo in photos]
    fresh_predictor.match(images[:3], ["a cat", "a red cup", "stars"])
    with count_compilations() as count:
        # 4 pairs share the batch bucket of 3, and both sets of texts are shorter
        # than 16 tokens, the smallest length bucket.
        fresh_predictor.match(
            images[3:7],
            ["a small dog on the grass", "cups", "the night sky", "a rocket"],
        )
    assert count[0] == 0
    with count_compilations() as count:
        fresh_predictor.match(images[:5], ["a cat"] * 5)
    assert count[0] > 0, "a new batch bucket must compile, or the counter is broken"


def test_embeddings_reuse_compilation_within_bucket(fresh_predictor, photos):
    images = [photo.path() for photo in photos]
    texts = [photo.captions[0] for photo in photos]
    fresh_predictor.encode_images(images[:5])
    fresh_predictor.encode_texts(texts[:5])
    with count_compilations() as count:
        fresh_predictor.encode_images(images[:7])
        fresh_predictor.encode_texts(texts[5:11])
        fresh_predictor.similarity(images[:6], texts[:8])
    assert count[0] == 0


def test_retrieval_reuses_compilation_and_gallery(fresh_predictor, photos, monkeypatch):
    images = [photo.path() for photo in photos]
    # Short texts keep every re-ranking batch in the 16-token bucket.
    texts = [f"a photo of {photo.id}" for photo in photos]
    gallery = fresh_predictor.index_texts(texts)
    fresh_predictor.retrieve_texts(images[:3], gallery, k=2, candidates=4)
    with count_compilations() as count:
        fresh_predictor.retrieve_texts(images[3:7], gallery, k=3, candidates=4)
    assert count[0] == 0

    fresh_predictor.retrieve_images(texts[:2], images, k=2)
    calls = []
    original = fresh_predictor.index_images
    monkeypatch.setattr(
        fresh_predictor,
        "index_images",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    fresh_predictor.retrieve_images(texts[2:4], list(images), k=2)
    assert calls == [], "a gallery passed again as a list must not be re-embedded"


@pytest.mark.parametrize(
    ("n", "minimum", "maximum", "expected"),
    [
        (1, 1, None, 1),
        (3, 1, None, 4),
        (4, 1, None, 4),
        (5, 1, 8, 8),
        (9, 1, 8, 8),
        (3, 16, 512, 16),
        (17, 16, 512, 32),
        (300, 16, 62, 62),
    ],
)
def test_bucket_size_rounds_up_to_power_of_two(n, minimum, maximum, expected):
    assert bucket_size(n, minimum=minimum, maximum=maximum) == expected


def test_predictor_pairs_single_image_with_texts(predictor, photos):
    image = photos[0].path()
    texts = [photo.captions[0] for photo in photos[:3]]
    together = predictor.match(image, texts)
    separate = predictor.match([image] * 3, texts)
    np.testing.assert_array_equal(together, separate)


def test_match_matrix_equals_pairwise_match(predictor, photos):
    images = [photo.path() for photo in photos[:2]]
    texts = [photo.captions[0] for photo in photos[:3]]
    matrix = predictor.match_matrix(images, texts)
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(
        matrix[1, 2], predictor.match(images[1], texts[2])[0], atol=1e-6
    )


def test_itm_only_retrieval_scores_every_pair(
    checkpoint, photos, reference_processor, caplog
):
    directory, models = checkpoint
    itm_only = Predictor.from_pretrained(directory, head="itm", progress=False)
    images = [photo.path() for photo in photos[:4]]
    texts = [photo.captions[0] for photo in photos[:5]]
    with caplog.at_level(logging.WARNING, logger="bt_jax.inference"):
        results = itm_only.retrieve_texts(images, texts, k=5)
    assert "No ITC head" in caplog.text
    logits = reference_itm_logits(
        models,
        reference_processor,
        [image for image in images for _ in texts],
        [text for _ in images for text in texts],
    ).reshape(len(images), len(texts), 2)
    assert_distinct(np.sort(logits[..., 1], axis=1))
    expected = np.argsort(-logits[..., 1], axis=1, kind="stable")
    assert [[m.index for m in row] for row in results] == expected.tolist()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p, img: p.match([img, img], ["a", "b", "c"]),
            "2 image\\(s\\) and 3 text\\(s\\)",
        ),
        (lambda p, img: p.fill_mask(img, "no mask here"), "has no <mask> token"),
        (lambda p, img: p.retrieve_texts(img, ["a cat"], k=0), "k must be a positive"),
        (
            lambda p, img: p.retrieve_texts(img, ["a cat"], k=2.5),
            "k must be a positive",
        ),
        (lambda p, img: p.retrieve_texts(img, []), "the gallery is empty"),
        (lambda p, img: p.encode_texts([]), "no texts given"),
        (lambda p, img: p.encode_images([]), "no images given"),
        (
            lambda p, img: p.similarity(p.index_texts(["a"]), p.index_texts(["b"])),
            "expects a gallery of images",
        ),
        (
            lambda p, img: p.fill_mask(img, "word " * 100 + "a <mask>"),
            "past the 62-token limit",
        ),
        (lambda p, img: p.match(img, "   "), "text 0 is empty"),
        (
            lambda p, img: p.retrieve_texts(
                img, Gallery("image", [], [], np.zeros((0, 16)))
            ),
            "expects a gallery of texts",
        ),
        (lambda p, img: p.match("missing.png", "a cat"), "image file not found"),
    ],
)
def test_predictor_bad_input_raises(predictor, photos, call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(predictor, photos[0].path())


def test_predictor_without_head_names_it(checkpoint, photos):
    directory, _ = checkpoint
    itm_only = Predictor.from_pretrained(directory, head="itm", progress=False)
    with pytest.raises(ValueError, match="needs the itc head"):
        itm_only.similarity(photos[0].path(), "a cat")
    with pytest.raises(ValueError, match="needs the mlm head"):
        itm_only.fill_mask(photos[0].path(), "a <mask>")


def test_error_names_position_in_whole_list(predictor, photos):
    images = [photos[i % len(photos)].path() for i in range(20)]
    images[18] = np.zeros((40, 40, 3), np.float32)  # float pixels are rejected
    with pytest.raises(ValueError, match="image 18 is a float32 array"):
        predictor.encode_images(images)


def test_long_query_warns_once(predictor, photos, caplog):
    long_text = "a cat " * 100
    images = [photo.path() for photo in photos[:5]]
    with caplog.at_level(logging.WARNING, logger="bt_jax.inference"):
        predictor.retrieve_images(long_text, images, k=2, candidates=4)
    assert caplog.text.count("truncating") == 1


def test_fill_mask_sequence_keeps_other_masks(predictor, photos):
    mask = predictor.processor.mask_token
    (per_mask,) = predictor.fill_mask(photos[0].path(), f"a {mask} on a {mask}")
    first, second = per_mask[0][0], per_mask[1][0]
    assert first.sequence.count(mask) == 1
    assert second.sequence.count(mask) == 1
    assert first.sequence.startswith("a")


def test_predictor_accepts_batch_arrays(predictor, photos):
    pixels = np.stack(
        [
            np.asarray(Image.open(p.path()).convert("RGB").resize((80, 60)))
            for p in photos[:3]
        ]
    )
    from_numpy = predictor.encode_images(pixels)
    from_torch = predictor.encode_images(torch.from_numpy(pixels))
    from_generator = predictor.encode_images(iter(list(pixels)))
    assert from_numpy.shape == (3, 16)
    np.testing.assert_array_equal(from_torch, from_numpy)
    np.testing.assert_array_equal(from_generator, from_numpy)


def test_predictor_rejects_unknown_setting(checkpoint):
    directory, _ = checkpoint
    with pytest.raises(TypeError, match="pipline"):
        Predictor.from_pretrained(directory, pipline="original")


def test_predictor_rejects_crop_model_mismatch(checkpoint):
    directory, _ = checkpoint
    with pytest.raises(ValueError, match="crops to 48x48 but the model takes 64x64"):
        Predictor.from_pretrained(directory, crop_size=48)


def test_predictor_without_tokenizer_raises(checkpoint, tmp_path):
    directory, _ = checkpoint
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(directory / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Predictor.from_pretrained(tmp_path)
