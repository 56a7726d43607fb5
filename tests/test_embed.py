"""bt_jax.embed: embeddings against the PyTorch reference, and the embedding job.

The checkpoint stores the MLM, ITM and ITC heads on one perturbed random
backbone (512-dimensional ITC embeddings, as in the released checkpoint), with
a tokenizer trained on the sample captions and 64 px preprocessing. The
reference side preprocesses with transformers' own processor and runs
transformers' `BridgeTowerForContrastiveLearning`.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from bt_jax.embed import (
    Embedder,
    EmbeddingStore,
    SettingsMismatchError,
    job,
    open_source,
    plot_store,
    top_k,
)
from bt_jax.embed.plot import pca
from bt_jax.processing import BridgeTowerImageProcessor, train_tokenizer
from tests.helpers import (
    REPO,
    run_convert,
    sample_config,
    save_multihead_checkpoint,
)

IMAGE_SIZE = 64
EMBED_DIM = 512
ATOL = 1e-5
REFERENCE_NAMES = {
    "text": "text_embeds",
    "image": "image_embeds",
    "joint": "cross_embeds",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("embed-model")
    models = save_multihead_checkpoint(
        directory, sample_config(contrastive_hidden_size=EMBED_DIM), seed=5
    )
    photos = samples.load_samples()
    captions = [caption for photo in photos for caption in photo.captions]
    train_tokenizer(captions, directory, vocab_size=1000)
    BridgeTowerImageProcessor(size=IMAGE_SIZE).save_pretrained(directory)
    return directory, models["itc"]


@pytest.fixture(scope="module")
def embedder(checkpoint):
    directory, _ = checkpoint
    return Embedder.from_pretrained(directory, batch_size=8)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("embed-samples") / "samples"
    samples.materialize(directory)
    return directory


def sample_records(sample_dir: Path) -> list[dict]:
    with (sample_dir / "captions.jsonl").open(encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def reference_embeddings(checkpoint, images, texts) -> dict[str, np.ndarray]:
    """Run transformers' processor and contrastive model on paths and texts."""
    directory, model = checkpoint
    size = {"shortest_edge": IMAGE_SIZE}
    processor = transformers.BridgeTowerProcessor(
        image_processor=BridgeTowerImageProcessorPil(size=size, crop_size=size),
        tokenizer=transformers.RobertaTokenizerFast.from_pretrained(directory),
    )
    pil = [reference_load_image(str(image)) for image in images]
    encoded = processor(images=pil, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**encoded)
    return {kind: outputs[name].numpy() for kind, name in REFERENCE_NAMES.items()}


def write_jsonl(path: Path, records: list) -> Path:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            line = record if isinstance(record, str) else json.dumps(record)
            file.write(line + "\n")
    return path


def run_job(embedder, source_path, out, **kwargs):
    return job.run(embedder, open_source(source_path), out, progress=False, **kwargs)


def output_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


# --------------------------------------------------------------- parity


def test_embedder_pairs_match_reference(checkpoint, embedder, sample_dir):
    """All three embeddings of 20 pairs: two full batches of 8 and a partial one."""
    records = sample_records(sample_dir)[::3]
    images = [sample_dir / record["image"] for record in records]
    texts = [record["caption"] for record in records]
    expected = reference_embeddings(checkpoint, images, texts)

    actual = embedder.embed_pairs(images, texts)

    for kind in REFERENCE_NAMES:
        assert actual[kind].dtype == np.float32
        np.testing.assert_allclose(actual[kind], expected[kind], atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(actual[kind], axis=1), 1, atol=1e-5)


def test_embedder_texts_and_images_match_reference(checkpoint, embedder, sample_dir):
    records = sample_records(sample_dir)[:11]
    images = [sample_dir / record["image"] for record in records]
    texts = [record["caption"] for record in records]
    expected = reference_embeddings(checkpoint, images, texts)

    np.testing.assert_allclose(
        embedder.embed_texts(texts), expected["text"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        embedder.embed_images(images), expected["image"], atol=ATOL, rtol=0
    )


def test_embedder_loads_bt_jax_format(checkpoint, embedder, sample_dir, tmp_path):
    """A checkpoint converted to bt-jax's format gives the reference embeddings."""
    directory, _ = checkpoint
    result = run_convert("to-jax", directory, tmp_path / "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    records = sample_records(sample_dir)[1::6]
    images = [sample_dir / record["image"] for record in records]
    texts = [record["caption"] for record in records]
    expected = reference_embeddings(checkpoint, images, texts)

    actual = Embedder.from_pretrained(tmp_path / "jax", batch_size=4).embed_pairs(
        images, texts
    )

    for kind in REFERENCE_NAMES:
        np.testing.assert_allclose(actual[kind], expected[kind], atol=ATOL, rtol=0)


def test_embedder_float16_is_float32_rounded(checkpoint, embedder, sample_dir):
    directory, _ = checkpoint
    half = Embedder.from_pretrained(directory, batch_size=8, dtype="float16")
    texts = [record["caption"] for record in sample_records(sample_dir)[:5]]

    result = half.embed_texts(texts)

    assert result.dtype == np.float16
    np.testing.assert_array_equal(
        result, embedder.embed_texts(texts).astype(np.float16)
    )


def test_embedder_rejects_bad_settings_and_inputs(checkpoint, embedder):
    directory, _ = checkpoint
    with pytest.raises(ValueError, match="float32 or float16, not 'float64'"):
        Embedder.from_pretrained(directory, dtype="float64")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Embedder.from_pretrained(directory, batch_size=0)
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        embedder.embed_pairs(["a.png", "b.png"], ["one text"])
    with pytest.raises(ValueError, match="text 0 is empty"):
        embedder.embed_texts([" "])


def test_embedder_requires_itc_head(tmp_path):
    directory = tmp_path / "itm-only"
    model = transformers.BridgeTowerForImageAndTextRetrieval(
        transformers.BridgeTowerConfig.from_dict(sample_config())
    )
    model.save_pretrained(directory)
    with pytest.raises(ValueError, match=r"need the contrastive \(ITC\) head"):
        Embedder.from_pretrained(directory)


SHARDED_SCRIPT = """
import sys
import jax
import numpy as np
from bt_jax.embed import Embedder

jax.config.update("jax_default_matmul_precision", "highest")
directory, images, texts, out = sys.argv[1], sys.argv[2:17], sys.argv[17:32], sys.argv[32]
assert jax.local_device_count() == 8, jax.local_devices()
embedder = Embedder.from_pretrained(directory, batch_size=12)
assert embedder.batch_size == 16, embedder.batch_size
result = embedder.embed_pairs(images, texts)
np.savez(out, **{kind: result[kind] for kind in ("joint", "text", "image")})
"""


def test_embedder_on_8_devices_matches_reference(checkpoint, sample_dir, tmp_path):
    """Batches split over 8 simulated CPU devices give the reference embeddings."""
    directory, _ = checkpoint
    records = sample_records(sample_dir)[::4][:15]
    images = [str(sample_dir / record["image"]) for record in records]
    texts = [record["caption"] for record in records]
    out = tmp_path / "sharded.npz"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SHARDED_SCRIPT,
            str(directory),
            *images,
            *texts,
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = reference_embeddings(checkpoint, images, texts)
    with np.load(out) as actual:
        for kind in REFERENCE_NAMES:
            np.testing.assert_allclose(actual[kind], expected[kind], atol=ATOL, rtol=0)


# --------------------------------------------------------------- the job


def test_job_files_match_reference(checkpoint, embedder, sample_dir, tmp_path):
    records = sample_records(sample_dir)
    result = run_job(
        embedder,
        sample_dir / "captions.jsonl",
        tmp_path / "out",
        kinds="joint,text,image",
        shard_size=16,
    )

    assert (result.embedded, result.skipped, result.total) == (58, 0, 58)
    store = EmbeddingStore(tmp_path / "out")
    listed = store.records(range(len(records)))
    assert [row["id"] for row in listed] == [record["id"] for record in records]
    assert [row["position"] for row in listed] == list(range(len(records)))
    assert listed[0]["photo"] == records[0]["photo"]
    expected = reference_embeddings(
        checkpoint,
        [sample_dir / record["image"] for record in records],
        [record["caption"] for record in records],
    )
    for kind in REFERENCE_NAMES:
        vectors = np.load(tmp_path / "out" / f"{kind}.npy")
        assert vectors.shape == (58, EMBED_DIM)
        np.testing.assert_allclose(vectors, expected[kind], atol=ATOL, rtol=0)
    assert not (tmp_path / "out" / job.SHARDS).exists()


def test_job_skips_and_lists_bad_records(checkpoint, embedder, sample_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = sample_records(sample_dir)[:3]
    for record in good:
        record["image"] = str(sample_dir / record["image"])
    lines = [
        good[0],
        {
            "image": str(tmp_path / "gone.png"),
            "caption": "a missing image",
            "id": "gone",
        },
        "{not json",
        {"image": good[0]["image"], "caption": "   ", "id": "blank"},
        good[1],
        {
            "image": str(tmp_path / "broken.png"),
            "text": "a broken file",
            "id": "broken",
        },
        {"image": str(tmp_path / "empty.jpg"), "text": "an empty file", "id": "empty"},
        ["a", "list"],
        {"image": good[0]["image"], "id": "no-caption"},
        {"caption": "no image here", "id": "no-image"},
        "",
        good[2],
    ]
    source = write_jsonl(tmp_path / "records.jsonl", lines)

    result = run_job(embedder, source, tmp_path / "out", shard_size=5)

    assert (result.embedded, result.skipped, result.total) == (3, 9, 12)
    skipped = [json.loads(line) for line in (tmp_path / "out" / job.SKIPPED).open()]
    reasons = {row["position"]: (row["id"], row["reason"]) for row in skipped}
    assert set(reasons) == {1, 2, 3, 5, 6, 7, 8, 9, 10}
    assert reasons[1][0] == "gone"
    assert reasons[1][1].startswith("missing image")
    assert reasons[2] == (
        "line-3",
        "invalid JSON: Expecting property name enclosed in double quotes",
    )
    assert reasons[3] == ("blank", "empty caption")
    assert reasons[5][1].startswith("unreadable image")
    assert reasons[6][1].startswith("unreadable image")
    assert reasons[7] == ("line-8", "a JSON list, not an object")
    assert reasons[8] == ("no-caption", "no caption")
    assert reasons[9] == ("no-image", "no image")
    assert reasons[10] == ("line-11", "empty line")
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / job.IDS).open()]
    assert ids == [record["id"] for record in good]
    expected = embedder.embed_joint(
        [record["image"] for record in good], [record["caption"] for record in good]
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "joint.npy"), expected, atol=1e-6
    )


def test_jsonl_source_edge_cases(embedder, tmp_path):
    """A byte order mark, a null id, a position field, invalid UTF-8, null text."""
    source = tmp_path / "records.jsonl"
    source.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"text": "first", "id": None, "position": "mine"}).encode()
        + b"\n"
        + b'{"text": "caf\xe9"}\n'
        + json.dumps({"text": None, "caption": "the caption"}).encode()
        + b"\n"
    )

    result = run_job(embedder, source, tmp_path / "out", kinds="text")

    assert (result.embedded, result.skipped) == (2, 1)
    rows = [json.loads(line) for line in (tmp_path / "out" / job.IDS).open()]
    assert [(row["id"], row["position"], row["text"]) for row in rows] == [
        ("line-1", 0, "first"),
        ("line-3", 2, "the caption"),
    ]
    skipped = json.loads((tmp_path / "out" / job.SKIPPED).read_text())
    assert skipped["reason"].startswith("invalid UTF-8")
    array = tmp_path / "array.json"
    array.write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(ValueError, match="looks like a JSON array, not JSON Lines"):
        open_source(array)


def test_folder_source_non_utf8_name(embedder, sample_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    (folder / name).write_bytes((sample_dir / "images" / "coffee.png").read_bytes())

    result = run_job(embedder, folder, tmp_path / "out", kinds="image")

    assert result.embedded == 1
    (row,) = [json.loads(line) for line in (tmp_path / "out" / job.IDS).open()]
    assert row["id"] == name


def test_embedder_takes_one_pair_and_bytes(embedder, sample_dir):
    path = sample_dir / "images" / "chelsea.png"
    text = "A close up of a tabby cat's face with green eyes."

    one = embedder.embed_pairs(path, text)
    listed = embedder.embed_pairs([path], [text])

    assert one.joint.shape == (1, EMBED_DIM)
    np.testing.assert_array_equal(one.joint, listed.joint)
    np.testing.assert_array_equal(
        embedder.embed_images(path.read_bytes()), embedder.embed_images([path])
    )


def test_job_text_kind_needs_no_image(embedder, tmp_path):
    long_text = "a very long caption " * 40  # over the model's token limit
    texts = ["a red bicycle", "two dogs", long_text]
    lines = [
        {"text": texts[0]},
        {"text": texts[1], "image": "absent.png"},
        {"text": long_text},
    ]
    source = write_jsonl(tmp_path / "texts.jsonl", lines)

    result = run_job(embedder, source, tmp_path / "out", kinds="text")

    assert (result.embedded, result.skipped, result.truncated) == (3, 0, 1)
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "text.npy"), embedder.embed_texts(texts), atol=1e-6
    )


def test_job_reads_crlf_and_lists_cr_only_lines(embedder, tmp_path):
    texts = ["a red bicycle", "two dogs", "a bowl of soup"]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(
        b"".join(json.dumps({"text": t}).encode() + b"\r\n" for t in texts)
    )
    cr_only = tmp_path / "cr.jsonl"
    cr_only.write_bytes(b"\r".join(json.dumps({"text": t}).encode() for t in texts))

    windows = run_job(embedder, crlf, tmp_path / "crlf", kinds="text")
    old_mac = run_job(embedder, cr_only, tmp_path / "cr", kinds="text")

    assert (windows.embedded, windows.skipped) == (3, 0)
    np.testing.assert_allclose(
        np.load(tmp_path / "crlf" / "text.npy"), embedder.embed_texts(texts), atol=1e-6
    )
    assert (old_mac.total, old_mac.embedded, old_mac.skipped) == (1, 0, 1)
    skipped = json.loads((tmp_path / "cr" / job.SKIPPED).read_text())
    assert skipped["reason"].startswith("invalid JSON")


def test_folder_source_skips_linked_folders(sample_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    image = (sample_dir / "images" / "chelsea.png").read_bytes()
    (folder / "cats" / "chelsea.png").write_bytes(image)
    (folder / "cats" / "loop").symlink_to(folder, target_is_directory=True)

    source = open_source(folder)

    assert len(source) == 1
    assert list(source.raw()) == ["cats/chelsea.png"]


def test_job_reads_image_folder(embedder, sample_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    (folder / "cups").mkdir()
    images = sample_dir / "images"
    for name, target in [
        ("chelsea.png", "cats/chelsea.png"),
        ("coffee.png", "cups/coffee.png"),
        ("astronaut.png", "astronaut.png"),
    ]:
        (folder / target).write_bytes((images / name).read_bytes())
    (folder / "cats" / "chelsea.txt").write_text("A tabby cat.\n")
    (folder / "cups" / "coffee.txt").write_text("A cup of coffee.")
    (folder / "notes.md").write_text("not an image")

    joint = run_job(embedder, folder, tmp_path / "joint")
    image = run_job(embedder, folder, tmp_path / "image", kinds="image")

    assert (joint.embedded, joint.skipped) == (2, 1)
    skipped = json.loads((tmp_path / "joint" / job.SKIPPED).read_text())
    assert (skipped["id"], skipped["reason"]) == ("astronaut.png", "no caption")
    rows = [json.loads(line) for line in (tmp_path / "joint" / job.IDS).open()]
    assert [(row["id"], row["label"], row["text"]) for row in rows] == [
        ("cats/chelsea.png", "cats", "A tabby cat."),
        ("cups/coffee.png", "cups", "A cup of coffee."),
    ]
    np.testing.assert_allclose(
        np.load(tmp_path / "joint" / "joint.npy"),
        embedder.embed_joint(
            [folder / "cats/chelsea.png", folder / "cups/coffee.png"],
            ["A tabby cat.", "A cup of coffee."],
        ),
        atol=1e-6,
    )
    assert (image.embedded, image.skipped) == (3, 0)


def test_job_interrupted_and_resumed_gives_identical_files(
    embedder, sample_dir, tmp_path, monkeypatch
):
    source = sample_dir / "captions.jsonl"
    kwargs = dict(kinds="joint,text", shard_size=7)
    run_job(embedder, source, tmp_path / "whole", **kwargs)

    real = job._embed_shard
    calls = []

    def failing(*args, **kw):
        shard = args[4]
        if shard == 4:
            raise KeyboardInterrupt
        calls.append(shard)
        return real(*args, **kw)

    monkeypatch.setattr(job, "_embed_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        run_job(embedder, source, tmp_path / "resumed", **kwargs)
    assert calls == [0, 1, 2, 3]
    assert not (tmp_path / "resumed" / "joint.npy").exists()

    def counting(*args, **kw):
        calls.append(args[4])
        return real(*args, **kw)

    monkeypatch.setattr(job, "_embed_shard", counting)
    calls.clear()
    run_job(embedder, source, tmp_path / "resumed", **kwargs)

    assert calls == [4, 5, 6, 7, 8]  # 58 records in 9 shards; 0-3 were done
    assert output_files(tmp_path / "resumed") == output_files(tmp_path / "whole")


def test_job_rejects_other_settings_and_foreign_folders(embedder, sample_dir, tmp_path):
    source = sample_dir / "captions.jsonl"
    out = tmp_path / "out"
    (out / job.SHARDS).mkdir(parents=True)
    job._write_json(
        out / job.MANIFEST,
        {
            "settings": {"format": job.FORMAT_VERSION, "kinds": ["text"]},
            "complete": False,
        },
    )
    with pytest.raises(SettingsMismatchError, match=r"kinds: \['text'\] there"):
        run_job(embedder, source, out)

    result = run_job(embedder, source, out, overwrite=True, kinds="text")
    assert result.embedded == 58

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    (other / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(FileExistsError, match="is not an embedding job's folder"):
        run_job(embedder, source, other)
    with pytest.raises(FileExistsError, match="is not an embedding job's folder"):
        run_job(embedder, source, other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"

    inside = tmp_path / "inside"
    inside.mkdir()
    records = write_jsonl(inside / "records.jsonl", [{"text": "a cat"}])
    with pytest.raises(ValueError, match="is inside the output folder"):
        run_job(embedder, records, inside, kinds="text", overwrite=True)
    assert records.is_file()


def test_job_rejects_changed_weights_and_folder_files(
    checkpoint, embedder, sample_dir, tmp_path
):
    directory, _ = checkpoint
    source = sample_dir / "captions.jsonl"
    run_job(embedder, source, tmp_path / "out", kinds="text")
    changed = Embedder.from_pretrained(directory, batch_size=8)
    changed._state = jax.tree.map(lambda x: x * 1.01, changed._state)

    with pytest.raises(SettingsMismatchError, match="model_fingerprint"):
        run_job(changed, source, tmp_path / "out", kinds="text")

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(
        (sample_dir / "images" / "chelsea.png").read_bytes()
    )
    (folder / "cat.txt").write_text("A tabby cat.")
    run_job(embedder, folder, tmp_path / "folder")
    (folder / "cat.txt").write_text("A dog on a beach.")
    with pytest.raises(SettingsMismatchError, match="listing_sha256"):
        run_job(embedder, folder, tmp_path / "folder")


def test_job_rejects_a_second_writer(embedder, sample_dir, tmp_path):
    out = tmp_path / "out"
    with (tmp_path / ".out.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="another embedding job is writing"):
            run_job(embedder, sample_dir / "captions.jsonl", out, kinds="text")
    assert not out.exists()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_job_memory_stays_flat_over_10000_records(embedder, tmp_path, monkeypatch):
    """Resident memory after the warm-up shards does not grow with the records.

    Keeping every result would add at least 10,000 x 512 x 4 bytes per kind,
    about 59 MiB for the three kinds, plus the ids.
    """
    rng = np.random.default_rng(0)
    images = []
    for i in range(20):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), np.uint8)).save(path)
        images.append(path.name)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "red",
        "blue",
        "small",
        "large",
        "dog",
        "cat",
        "car",
        "tree",
        "on",
        "in",
        "with",
    ]
    records = [
        {
            "image": images[i % len(images)],
            "text": " ".join(rng.choice(words, size=3 + i % 9)),
            "id": f"record-{i}",
        }
        for i in range(10_000)
    ]
    source = write_jsonl(tmp_path / "records.jsonl", records)
    peaks: list[int] = []
    stop = threading.Event()
    current = {"peak": 0}

    def sample():
        while not stop.is_set():
            current["peak"] = max(current["peak"], _rss_bytes())
            time.sleep(0.01)

    real = job._embed_shard

    def measured(*args, **kwargs):
        current["peak"] = _rss_bytes()
        rows = real(*args, **kwargs)
        peaks.append(current["peak"])
        return rows

    monkeypatch.setattr(job, "_embed_shard", measured)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_job(
            embedder, source, tmp_path / "out", kinds="joint,text,image", shard_size=500
        )
    finally:
        stop.set()
        sampler.join()

    assert result.embedded == 10_000
    assert len(peaks) == 20
    growth = max(peaks[5:]) - max(peaks[2:5])
    assert growth < 12 * 2**20, [f"{peak / 2**20:.1f}" for peak in peaks]


# ------------------------------------------------------------ search, plot


def test_top_k_equals_brute_force_ranking():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(1000, 16)).astype(np.float32)
    matrix[500] = matrix[10]  # a tie: the lower row ranks first
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = np.concatenate([matrix[10:11] * 3, rng.normal(size=(4, 16))])

    for block_rows in (7, 128, 4096):
        indices, scores = top_k(matrix, queries, 10, block_rows=block_rows)
        normalised = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        similarity = normalised.astype(np.float32) @ matrix.T
        for row in range(len(queries)):
            expected = sorted(range(1000), key=lambda i: (-similarity[row, i], i))[:10]
            assert indices[row].tolist() == expected
            np.testing.assert_allclose(
                scores[row], similarity[row, expected], atol=1e-6
            )
    assert indices[0, :2].tolist() == [10, 500]


def test_top_k_rejects_wrong_dimension_and_k():
    matrix = np.eye(4, dtype=np.float32)
    with pytest.raises(
        ValueError, match="queries have 3 dimensions and the embeddings 4"
    ):
        top_k(matrix, np.ones(3), 1)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        top_k(matrix, np.ones(4), 0)
    with pytest.raises(ValueError, match="contains NaN or infinity"):
        top_k(matrix, np.array([1.0, np.nan, 0.0, 0.0]), 1)
    indices, _ = top_k(matrix, np.ones(4), np.int64(2))
    assert indices.shape == (1, 2)


def test_store_search_with_text_query(checkpoint, embedder, sample_dir, tmp_path):
    run_job(
        embedder, sample_dir / "captions.jsonl", tmp_path / "out", kinds="joint,image"
    )
    store = EmbeddingStore(tmp_path / "out")
    query = "A cup of espresso on a red saucer with a small spoon."

    (hits,) = store.search(embedder.embed_texts([query]), k=5, kind="joint")

    joint = np.load(tmp_path / "out" / "joint.npy")
    similarity = joint @ embedder.embed_texts([query])[0]
    assert [hit.index for hit in hits] == np.argsort(-similarity, kind="stable")[
        :5
    ].tolist()
    rows = sample_records(sample_dir)
    assert [hit.id for hit in hits] == [rows[hit.index]["id"] for hit in hits]
    assert hits[0].score == pytest.approx(similarity.max(), abs=1e-6)
    with pytest.raises(
        ValueError, match="contains joint, image embeddings, not 'text'"
    ):
        store.search(np.zeros(EMBED_DIM), kind="text")


def test_store_refuses_unfinished_job(tmp_path):
    job._write_json(tmp_path / job.MANIFEST, {"settings": {}, "complete": False})
    with pytest.raises(ValueError, match="has not finished"):
        EmbeddingStore(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        EmbeddingStore(tmp_path / "missing")


def test_pca_recovers_the_main_directions():
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    # Centred and uncorrelated, so the principal axes are exactly the basis vectors.
    a = rng.normal(size=200) * 5
    a -= a.mean()
    b = rng.normal(size=200)
    b -= b.mean()
    b -= (b @ a) / (a @ a) * a
    points = np.outer(a, basis[:, 0]) + np.outer(b, basis[:, 1]) + 3.0

    projected = pca(points)

    np.testing.assert_allclose(np.abs(projected[:, 0]), np.abs(a), atol=1e-6)
    np.testing.assert_allclose(np.abs(projected[:, 1]), np.abs(b), atol=1e-6)


def test_plot_store_writes_png_coloured_by_label(embedder, sample_dir, tmp_path):
    run_job(embedder, sample_dir / "captions.jsonl", tmp_path / "out")

    path = plot_store(
        tmp_path / "out", tmp_path / "map.png", label="photo", method="pca"
    )

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 400
    with pytest.raises(ValueError, match="no record has the field 'colour'"):
        plot_store(tmp_path / "out", tmp_path / "x.png", label="colour")


# --------------------------------------------------------------- the program


def _cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bt_jax.embed", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_cli_stopped_by_sigterm_resumes_to_identical_files(
    checkpoint, embedder, sample_dir, tmp_path
):
    """SIGTERM mid-job keeps finished shards; the same command then completes."""
    directory, _ = checkpoint
    records = sample_records(sample_dir) * 6
    for record in records:
        record["image"] = str(sample_dir / record["image"])
    source = write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "out"
    args = (
        directory,
        source,
        out,
        "--batch-size",
        8,
        "--shard-size",
        8,
        "--no-progress",
    )

    process = _cli(*args)
    deadline = time.monotonic() + 300
    while len(list((out / job.SHARDS).glob("*.done.json"))) < 2:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Run the same command again to resume" in stderr
    done = len(list((out / job.SHARDS).glob("*.done.json")))
    assert 2 <= done < 44

    process = _cli(*args)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert f"{done} of 44 shards are done" in stderr
    assert "Embedded 348 of 348 records" in stderr

    run_job(
        embedder,
        source,
        tmp_path / "whole",
        shard_size=8,
        model=str(Path(directory).resolve()),
    )
    assert output_files(out) == output_files(tmp_path / "whole")


def test_cli_search_and_plot(checkpoint, embedder, sample_dir, tmp_path):
    directory, _ = checkpoint
    run_job(
        embedder,
        sample_dir / "captions.jsonl",
        tmp_path / "out",
        model=str(Path(directory).resolve()),
    )
    query = "A striped brown cat looks off to the side with its pink nose in focus."

    search = _cli("search", tmp_path / "out", query, "-k", 3, "--json")
    stdout, stderr = search.communicate(timeout=300)
    plot = _cli("plot", tmp_path / "out", tmp_path / "map.png", "--method", "pca")
    _, plot_stderr = plot.communicate(timeout=300)

    assert search.returncode == 0, stderr[-3000:]
    hits = [json.loads(line) for line in stdout.splitlines()]
    (expected,) = EmbeddingStore(tmp_path / "out").search(
        embedder.embed_texts([query]), k=3
    )
    assert [hit["row"] for hit in hits] == [hit.index for hit in expected]
    assert [hit["rank"] for hit in hits] == [1, 2, 3]
    assert plot.returncode == 0, plot_stderr[-3000:]
    assert (tmp_path / "map.png").stat().st_size > 10_000


def test_cli_reports_bad_input_and_exits_1(checkpoint, tmp_path):
    directory, _ = checkpoint
    process = _cli(directory, tmp_path / "absent.jsonl", tmp_path / "out")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "error: input not found" in stderr
    assert "Pass a folder of images or a JSON Lines file" in stderr
