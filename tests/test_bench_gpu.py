"""Tests of `python -m bench.gpu` on the CPU: a tiny run and its input checks.

The smoke run took 39 s on 2 CPU cores in a run of the whole suite, most of it
compiling the tiny training step (without LLVM's optimisations, see
tests/conftest.py). The other tests compile nothing
or a single small function.
"""

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from bench import flops, gpu
from bt_jax.config import load_preset

# Compares JAX programs with each other and checks behaviour only.
pytestmark = pytest.mark.fast_compile

TINY_RUN = [
    "--sizes",
    "tiny",
    "--programs",
    "train",
    "itm",
    "--batch",
    "2",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--length",
    "8",
]


def test_gpu_bench_tiny_writes_json(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert gpu.main([*TINY_RUN, "--json", str(path)]) == 0

    document = json.loads(path.read_text())
    for key in ("command", "backend", "device_kind", "versions", "flags"):
        assert key in document, key
    assert document["complete"] is True
    assert "jax" in document["versions"]
    assert "jaxlib" in document["versions"]
    assert document["flags"]["batch"] == {"tiny": 2}
    assert document["flags"]["attention_dropout"] is True
    results = {result["program"]: result for result in document["results"]}
    assert list(results) == ["train", "itm"]

    config = load_preset(gpu.REPO / "configs" / "tiny.py").to_dict()
    train, itm = results["train"], results["itm"]
    assert train["model_flops_per_step"] == flops.train_step_flops(config, 2, 8)
    assert itm["model_flops_per_step"] == flops.forward_flops(config, 2, 8, "itm")

    for program, result in results.items():
        assert len(result["step_seconds"]) == 1, program
        median = result["median_step_seconds"]
        assert median > 0, program
        assert result["compile_seconds"] > 0, program
        assert result["examples_per_second"] == pytest.approx(2 / median), program
        expected_mfu = result["model_flops_per_step"] / median / 989e12
        assert result["mfu"] == pytest.approx(expected_mfu), program
        assert result["memory_plan"]["argument_bytes"] > 0, program
        assert result["attention"]["cudnn_fmha_custom_calls"] == [], program
    assert math.isfinite(train["loss"])

    # Attention dropout keeps the text and cross-modal layers on the explicit
    # path in training. The vision tower has no attention dropout.
    assert train["attention"]["paths"] == ["xla-sdpa", "explicit-einsum"]
    assert itm["attention"]["paths"] == ["xla-sdpa"]

    table = capsys.readouterr().out
    assert "tiny  train" in table
    assert "explicit-einsum:" in table


def test_gpu_bench_unwritable_json_fails_before_compiling(
    tmp_path, monkeypatch, capsys
):
    def fail(*args, **kwargs):
        raise AssertionError("bench.gpu compiled before checking --json")

    monkeypatch.setattr(gpu, "run_program", fail)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    path = blocker / "out.json"

    with pytest.raises(SystemExit) as exit_info:
        gpu.main([*TINY_RUN, "--json", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--json {path}" in error
    assert "writable folder" in error


def test_gpu_bench_json_folder_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([*TINY_RUN, "--json", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch", "0"], "--batch 0 is invalid"),
        (["--batch", "tiny=-3"], "--batch tiny=-3 is invalid"),
        (["--batch", "two"], "--batch two is invalid"),
        (["--batch", "base=32"], "'base' is not among --sizes"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--warmup", "0"], "--warmup must be at least 1, got 0"),
        (["--length", "2"], "--length 2 is invalid for tiny"),
        (["--length", "63"], "--length 63 is invalid for tiny"),
        (["--peak-tflops", "0"], "--peak-tflops must be a positive number"),
        (["--sizes", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_gpu_bench_invalid_arguments_are_rejected(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(["--sizes", "tiny", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_bench_batch_per_size():
    args = gpu.parse_args(["--sizes", "tiny", "base", "--batch", "base=8"])
    assert args.batches == {"tiny": 4, "base": 8}
    args = gpu.parse_args(["--sizes", "tiny", "base", "--batch", "3"])
    assert args.batches == {"tiny": 3, "base": 3}


def test_gpu_bench_config_without_attention_dropout():
    config = gpu.load_config("tiny", attention_dropout=False)
    assert config.text_config.attention_probs_dropout_prob == 0.0
    assert config.text_config.hidden_dropout_prob == 0.1


def test_gpu_bench_config_fills_itc_sizes():
    config = gpu.load_config("base")
    assert config.contrastive_hidden_size == 512
    assert config.logit_scale_init_value == 2.6592


def test_gpu_bench_attention_paths_find_xla_attention():
    shape = (1, 4, 2, 8)

    def attention(query):
        return jax.nn.dot_product_attention(query, query, query)

    lowered = jax.jit(attention).lower(jnp.zeros(shape, jnp.float32))
    found = gpu.attention_paths(lowered, lowered.compile())
    assert found == {"paths": ["xla-sdpa"], "cudnn_fmha_custom_calls": []}


def test_gpu_bench_attention_paths_find_cudnn_call():
    # A GPU program's HLO, as compiled.as_text() prints a cuDNN attention call.
    hlo = (
        "%custom-call.1 = (bf16[2,40,12,64]{3,2,1,0}, u8[0]{0}) custom-call(...), "
        'custom_call_target="__cudnn$fmhaSoftmax", backend_config={}'
    )
    lowered = SimpleNamespace(as_text=lambda debug_info=False: "")
    compiled = SimpleNamespace(as_text=lambda: hlo)
    found = gpu.attention_paths(lowered, compiled)
    assert found["paths"] == ["cudnn-fmha"]
    assert found["cudnn_fmha_custom_calls"] == ["__cudnn$fmhaSoftmax"]


def test_gpu_bench_attention_paths_unknown_without_attention():
    lowered = jax.jit(jnp.tanh).lower(jnp.zeros(3))
    found = gpu.attention_paths(lowered, lowered.compile())
    assert found["paths"] == ["unknown"]
