"""Smoke test of the benchmarks: they run end to end and write their report."""

import subprocess
import sys

from helpers import REPO


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
