"""`python -m train` end to end: exact resume after kill -9, restore on one
device, SIGTERM, and two processes joined with jax.distributed.

Every run is a real subprocess on simulated CPU devices, training a tiny model
(width 64, 2 text and 2 vision layers, 1 cross-modal layer, 32 px images, a
300-token BPE vocabulary) on the sample photos. Runs with the same device count
and settings share XLA's persistent compilation cache, so the step compiles
once per device count. Runs are compared only with each other, so they compile
faster, without LLVM's optimisations (`helpers.FAST_COMPILE_ENV`).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE_ENV, REPO

from bt_jax import processing
from bt_jax.config import load_preset
from bt_jax.data.build import build_sample_dataset
from bt_jax.samples import load_samples

STEPS = 20
KILL_AFTER = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Build the sample dataset, a tokenizer and a model config once."""
    root = tmp_path_factory.mktemp("train_inputs")
    dataset = build_sample_dataset(root / "data")
    tokenizer = root / "tokenizer"
    captions = [caption for photo in load_samples() for caption in photo.captions]
    processing.train_tokenizer(captions, tokenizer, vocab_size=300)
    processing.BridgeTowerImageProcessor(size=32).save_pretrained(tokenizer)
    model = load_preset(REPO / "configs" / "tiny.py")
    config = model.to_dict()
    # Fewer layers than the tiny preset compile faster; every kind of layer stays.
    config["num_hidden_layers"] = 1
    config["text_config"]["vocab_size"] = 300
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    (root / "config.json").write_text(json.dumps(config))
    return {
        "dataset": str(dataset),
        "tokenizer": str(tokenizer),
        "model": str(root / "config.json"),
        "cache": str(root / "xla_cache"),
    }


def _train(inputs, workdir, devices, *extra, env=None, timeout=600):
    command = [
        sys.executable,
        "-m",
        "train",
        "--config",
        str(REPO / "configs" / "demo.py"),
        "--workdir",
        str(workdir),
        f"--config.model={inputs['model']}",
        f"--config.tokenizer={inputs['tokenizer']}",
        f"--config.data.dataset={inputs['dataset']}",
        "--config.data.eval_split=",
        f"--config.total_steps={STEPS}",
        "--config.global_batch_size=8",
        "--config.log_every_steps=1",
        "--config.checkpoint.every_steps=5",
        "--config.debug.log_batches=True",
        *extra,
    ]
    variables = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **FAST_COMPILE_ENV,
        "JAX_COMPILATION_CACHE_DIR": inputs["cache"],
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **(env or {}),
    }
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process, timeout=600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _run(inputs, workdir, devices, *extra) -> str:
    code, output = _finish(_train(inputs, workdir, devices, *extra))
    assert code == 0, output[-3000:]
    return output


def _losses(workdir) -> dict[int, float]:
    """Per-step train losses; a resumed run's records replace the earlier ones."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def _batches(workdir) -> dict[int, tuple]:
    batches = {}
    for line in (workdir / "batches.jsonl").read_text().splitlines():
        record = json.loads(line)
        batches[record["step"]] = (record["record_index"], record["text_index"])
    return batches


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(
        int(path.name)
        for path in (workdir / "checkpoints").iterdir()
        if path.name.isdigit()
    )


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """A straight 20-step run and a run killed with SIGKILL after step 12."""
    root = tmp_path_factory.mktemp("train_runs")
    straight, killed = root / "straight", root / "killed"
    _run(inputs, straight, 8)
    code, output = _finish(
        _train(inputs, killed, 8, f"--config.debug.signal_after_step={KILL_AFTER}")
    )
    assert code == -signal.SIGKILL, output[-3000:]
    # A copy taken before any resume, for restoring on one device.
    shutil.copytree(killed, root / "killed_1")
    return root


def test_train_resume_after_kill_is_exact(inputs, runs):
    straight, killed = runs / "straight", runs / "killed"
    saved = _checkpoint_steps(killed)
    assert saved, "the killed run left no checkpoint"
    assert max(saved) <= KILL_AFTER
    output = _run(inputs, killed, 8)
    assert f"resuming from step {max(saved)}" in output
    expected, resumed = _losses(straight), _losses(killed)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert resumed == expected
    assert _batches(killed) == _batches(straight)
    assert (killed / "model" / "config.json").is_file()


def test_train_restore_on_one_device(inputs, runs):
    # The 8-device checkpoint restores onto a mesh of another size. A 4-device
    # restore runs the same code, and it took 47 s in a suite run on 2 cores.
    straight, workdir = runs / "straight", runs / "killed_1"
    start = max(_checkpoint_steps(workdir))
    output = _run(inputs, workdir, 1)
    assert f"resuming from step {start}" in output
    expected, resumed = _losses(straight), _losses(workdir)
    first = start + 1
    # The first resumed step uses the restored parameters; later steps may
    # drift by float32 reassociation on the other device count.
    np.testing.assert_allclose(resumed[first], expected[first], rtol=1e-5)
    for step in range(first, STEPS + 1):
        np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-3)
    assert _batches(workdir) == _batches(straight)


def test_train_sigterm_saves_and_exits(inputs, runs):
    # The same settings as the 1-device restore, so the step comes from the cache.
    workdir = runs / "sigterm"
    code, output = _finish(
        _train(
            inputs,
            workdir,
            1,
            "--config.debug.signal_after_step=7",
            "--config.debug.signal=SIGTERM",
        )
    )
    assert code == 0, output[-3000:]
    assert "stopped at step 7 on request" in output
    assert _checkpoint_steps(workdir) == [5, 7]
    assert not (workdir / "model").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_train_two_processes_match_one(inputs, runs):
    # Two processes of 4 devices each form the 8-device mesh of the straight
    # run; both stop (SIGTERM, saving a checkpoint together) after step 3.
    port = _free_port()
    shared = runs / "two_processes"
    processes = [
        _train(
            inputs,
            shared,
            4,
            "--config.debug.signal_after_step=3",
            "--config.debug.signal=SIGTERM",
            env={
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
            },
        )
        for index in range(2)
    ]
    results = [_finish(process) for process in processes]
    for code, output in results:
        assert code == 0, output[-3000:]
    assert "joined 2 processes as process 0" in results[0][1]
    assert "joined 2 processes as process 1" in results[1][1]
    expected, joined = _losses(runs / "straight"), _losses(shared)
    assert sorted(joined) == [1, 2, 3]
    for step in (1, 2, 3):
        np.testing.assert_allclose(joined[step], expected[step], rtol=1e-5)
    assert _checkpoint_steps(shared) == [3]
