"""Tests of the benchmarks: they run end to end and write their reports.

`python -m bench` also gets checks of its analytic FLOP counts against
PyTorch's FLOP counter, and of its PyTorch optimizer against bt-jax's.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, TINY, make_batch, run_torch, torch_model

from bench import flops, torch_train


def test_data_throughput_bench_writes_report(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.data_throughput",
            "--settings",
            "0x1",
            "1x1",
            "--repeats",
            "1",
            "--batches",
            "1",
            "--batch-size",
            "4",
            "--copies",
            "1",
            "--size",
            "64",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "data_throughput.md").read_text()
    assert "| 0 | 1 |" in report
    assert "| 1 | 1 |" in report
    assert (tmp_path / "data_throughput.png").stat().st_size > 0


# The inference rows only: the quick training row spends 45 s compiling bt-jax's
# step, which the suite cannot afford. The FLOP and optimizer tests below cover
# the PyTorch step, and tests/test_training_*.py the bt-jax one.
QUICK_ROWS = ("tiny-itm-b2", "tiny-itc-b2", "tiny-mlm-b2")


def test_bench_quick_compares_frameworks(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--rows",
            *QUICK_ROWS,
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0
    document = json.loads((tmp_path / "results.json").read_text())
    rows = {row["row"]: row for row in document["rows"]}
    assert tuple(rows) == QUICK_ROWS
    for name, row in rows.items():
        assert f"| {name} |" in report
        for framework in ("jax", "torch"):
            rates = row[framework]["pairs_per_second"]
            assert len(rates) == 2, (name, framework, rates)
            assert min(rates) > 0, (name, framework, rates)
            assert row[framework]["max_rss_mib"] > 0, (name, framework)
        assert row["jax"]["compile_seconds"] > 0, name
        assert row["max_abs_diff"] < 1e-4, (name, row["max_abs_diff"])
        assert row["flops_per_call"] > 0, name
    assert min(document["matmul_peak_gflops"].values()) > 0


def test_bench_rejects_unknown_row(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--rows",
            "base-vqa-b1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "--rows base-vqa-b1 matches no row" in result.stderr
    assert "base-itm-b1" in result.stderr


def test_embed_bench_quick_writes_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.embed", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "EMBED_RESULTS.md").read_text()
    assert (tmp_path / "embed.png").stat().st_size > 0
    document = json.loads((tmp_path / "embed.json").read_text())
    measurements = {row["task"]: row for row in document["measurements"]}
    assert tuple(measurements) == ("job", "model")
    for task, name in (("job", "embedding job"), ("model", "model calls only")):
        row = measurements[task]
        difference = row["max_abs_diff"]
        assert difference < 1e-3, (task, difference)
        assert f"| {name} |" in report
        assert f"| {difference:.1e} |" in report, task
        for framework in ("jax", "torch"):
            rates = row[framework]["pairs_per_second"]
            assert len(rates) == 1, (task, framework, rates)
            assert min(rates) > 0, (task, framework, rates)
            assert row[framework]["max_rss_mib"] > 0, (task, framework)


def _count_flops(function, *args) -> int:
    """Count the matmul FLOPs of a PyTorch call, with attention as plain matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("head", ["itm", "itc", "mlm"])
def test_flops_match_torch_flop_counter(head):
    batch = make_batch(TINY, batch=2, length=9, empty_row=False)
    model = torch_model(TINY, head)
    counted = _count_flops(run_torch, model, head, batch)
    expected = flops.forward_flops(TINY, 2, 9, head)
    extra = flops.reference_extra_flops(TINY, head, 2, 9)
    assert counted == expected + extra


@pytest.mark.parametrize("share", [True, False], ids=["shared", "separate"])
def test_train_flops_match_torch_step(share):
    config = transformers.BridgeTowerConfig.from_dict(TINY)
    step = torch_train.PretrainingStep(
        torch_train.PretrainingModel(config), share_image_encoding=share
    )
    arrays = make_batch(TINY, batch=4, length=9, empty_row=False)
    batch = {
        key: torch.from_numpy(value.copy())
        for key, value in arrays.items()
        if key != "pixel_values"
    }
    batch["pixel_values"] = torch.from_numpy(
        arrays["pixel_values"].transpose(0, 3, 1, 2).copy()
    )
    batch["mlm_input_ids"] = batch["input_ids"]
    batch["mlm_labels"] = batch["input_ids"]
    batch["record_index"] = torch.arange(4)
    counted = _count_flops(step.losses, batch)
    # Each pass runs the whole backbone in PyTorch, as in inference.
    extra = flops.train_reference_extra_flops(TINY, 4, 9, backward=False)
    expected = flops.train_forward_flops(TINY, 4, 9, share_image_encoding=share)
    assert counted == expected + extra


def test_torch_optimizer_settings_match_bt_jax():
    from bt_jax.training import optim

    reference = optim.OptimizerConfig()
    settings = torch_train.OptimizerSettings()
    for field in dataclasses.fields(settings):
        assert getattr(settings, field.name) == getattr(reference, field.name), field
    assert reference.grad_clip_norm is None
    assert torch_train.NO_DECAY == optim.NO_DECAY
    assert torch_train.HEAD_MODULES == optim.HEAD_MODULES
    for step in (0, 500, reference.warmup, 60_000, reference.total_steps):
        expected = optim.learning_rate_schedule(reference)(step)
        actual = reference.learning_rate * settings.schedule_factor(step)
        assert abs(float(expected) - actual) < 1e-12, step


def test_flops_parts_sum_to_backbone():
    # backbone_flops is checked against PyTorch's FLOP counter above.
    parts = (
        flops.text_flops(TINY, 9)
        + flops.vision_flops(TINY)
        + flops.cross_modal_flops(TINY, 9, class_token_only=True)
    )
    assert parts == flops.backbone_flops(TINY, 9)


@pytest.mark.fast_compile
def test_step_parts_times_every_part(capsys):
    from bench import step_parts

    assert (
        step_parts.main(["--size=tiny", "--batch=1", "--repeats=1", "--peak-size=64"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    names = [line[:32].strip() for line in lines[2:]]
    assert names == [
        "vision encoder, B images",
        "text encoder, 3B texts",
        "cross-modal tower, 4B pairs",
        "same, gathering the images",
    ]
    for line in lines[2:]:
        seconds, work = (float(value) for value in line[32:].split()[:2])
        assert seconds > 0
        assert work > 0


def test_compiler_ab_times_both_executables(tmp_path, capsys):
    import bt_jax.compiler
    from bench import compiler_ab

    report = tmp_path / "ab.json"
    arguments = ["--quick", "--rows", "tiny-itm-b2", "--pairs", "2"]
    arguments += ["--work-dir", str(tmp_path), "--json", str(report)]
    chosen = bt_jax.compiler.compiler_options
    assert compiler_ab.main(arguments) == 0
    # The defaults runner's stand-in is gone again.
    assert bt_jax.compiler.compiler_options is chosen
    (result,) = json.loads(report.read_text())
    assert result["row"] == "tiny-itm-b2"
    for name in ("options", "defaults"):
        assert result["median_s"][name] > 0, name
        assert result["compile_s"][name] > 0, name
    assert result["max_abs_diff"] <= compiler_ab.OUTPUT_ATOL
    assert result["loss_diff_after_two_steps"] is None
    assert result["against_options"] is None
    assert result["options"] == bt_jax.compiler.compiler_options()
    assert "tiny-itm-b2" in capsys.readouterr().out


def test_compiler_ab_against_given_options(tmp_path, capsys):
    from bench import compiler_ab

    report = tmp_path / "ab.json"
    against = {"xla_cpu_experimental_ynn_fusion_type": ""}
    arguments = ["--quick", "--rows", "tiny-itm-b2", "--pairs", "1"]
    arguments += ["--against", json.dumps(against)]
    arguments += ["--work-dir", str(tmp_path), "--json", str(report)]
    assert compiler_ab.main(arguments) == 0
    (result,) = json.loads(report.read_text())
    assert result["against_options"] == against
    assert set(result["median_s"]) == {"options", "against"}
    assert len(result["seconds"]["against"]) == 1
    assert f"against: {json.dumps(against)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("against", "message"),
    [
        ("{x", "invalid JSON '{x'"),
        ("[1]", "'[1]' is not a JSON object"),
        ("{}", "compiles like XLA's defaults"),
        ('{"xla_cpu_use_thunk_runtime": null}', "has the value null"),
        ('{"xla_cpu_no_such_option": "1"}', "this jaxlib rejected"),
    ],
    ids=["not-json", "not-object", "empty", "null-value", "unknown-option"],
)
def test_compiler_ab_rejects_invalid_against(capsys, against, message):
    from bench import compiler_ab

    with pytest.raises(SystemExit) as exit_info:
        compiler_ab.main(["--quick", "--against", against])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compiler_ab_rejects_unwritable_paths(tmp_path, capsys):
    from bench import compiler_ab

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--json", str(tmp_path / "missing" / "ab.json")], "--json"),
        (["--json", str(tmp_path)], "--json"),
        (["--work-dir", str(a_file / "sub")], "cannot create --work-dir"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            compiler_ab.main(["--quick", *arguments])
        assert exit_info.value.code == 2, arguments
        assert message in capsys.readouterr().err, arguments


def test_compiler_ab_rejects_own_options(capsys):
    import bt_jax
    from bench import compiler_ab

    own = json.dumps(bt_jax.compiler_options())
    with pytest.raises(SystemExit) as exit_info:
        compiler_ab.main(["--quick", "--against", own])
    assert exit_info.value.code == 2
    assert "equals bt-jax's own options" in capsys.readouterr().err


def test_compiler_ab_rejects_unknown_row(capsys):
    from bench import compiler_ab

    with pytest.raises(SystemExit) as exit_info:
        compiler_ab.main(["--rows", "base-vqa-b1"])
    assert exit_info.value.code == 2
    assert "--rows base-vqa-b1 matches no row" in capsys.readouterr().err


def _fake_cache_workers(hits, stdout=None):
    """Return a stand-in for `subprocess.run` and the caches it was given.

    Each call stores 0.5 MiB in its cache and reports the next of `hits`.
    """
    caches = []

    def run(command, *, env, **_):
        cache = Path(env["JAX_COMPILATION_CACHE_DIR"])
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"entry-{len(caches)}").write_bytes(bytes(2**19))
        caches.append(cache)
        assert command[-5:] == ["--worker", "--size", "tiny", "--batch", "2"]
        timings = {
            "compile_step_seconds": 3.0 - len(caches),
            "cache_hits": hits[len(caches) - 1],
        }
        output = json.dumps(timings) if stdout is None else stdout
        return subprocess.CompletedProcess(command, 0, output, "")

    return run, caches


def _run_compile_cache(hits, tmp_path, monkeypatch):
    """Run `bench.compile_cache` with fake workers; return (status, report, caches)."""
    from bench import compile_cache

    run, caches = _fake_cache_workers(hits)
    monkeypatch.setattr(compile_cache.subprocess, "run", run)
    report = tmp_path / "cache.json"
    arguments = ["--size", "tiny", "--batch", "2", "--json", str(report)]
    return compile_cache.main(arguments), report, caches


def test_compile_cache_workers_share_cache(tmp_path, monkeypatch, capsys):
    status, report, caches = _run_compile_cache([0, 1], tmp_path, monkeypatch)
    assert status == 0
    assert len(caches) == 2
    assert caches[0] == caches[1]
    assert not caches[0].exists()  # the temporary cache is removed
    result = json.loads(report.read_text())
    assert result["empty_cache"]["compile_step_seconds"] == 2.0
    assert result["filled_cache"]["compile_step_seconds"] == 1.0
    assert result["filled_cache"]["cache_hits"] == 1
    assert result["cache_mib"] == 1.0
    assert json.loads(capsys.readouterr().out) == result


def test_compile_cache_without_hits_fails(tmp_path, monkeypatch, capsys):
    status, report, _ = _run_compile_cache([0, 0], tmp_path, monkeypatch)
    assert status == 1
    assert "loaded nothing from the cache" in capsys.readouterr().err
    assert not report.exists()


def test_compile_cache_worker_output_not_json(monkeypatch):
    from bench import compile_cache

    run, _ = _fake_cache_workers([0, 1], stdout="Segmentation fault\n")
    monkeypatch.setattr(compile_cache.subprocess, "run", run)
    with pytest.raises(SystemExit, match="last output line is not its JSON timings"):
        compile_cache.main(["--size", "tiny", "--batch", "2"])


def test_compile_cache_json_folder_missing(tmp_path, capsys):
    from bench import compile_cache

    with pytest.raises(SystemExit):
        compile_cache.main(["--json", str(tmp_path / "missing" / "cache.json")])
    assert "does not exist" in capsys.readouterr().err


def test_compile_cache_rejects_zero_batch():
    from bench import compile_cache

    with pytest.raises(SystemExit, match="--batch must be positive, got 0"):
        compile_cache.main(["--batch", "0"])
