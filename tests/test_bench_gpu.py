"""`python -m bench.gpu` runs end to end: here in its `--tiny` mode, on the CPU.

The GPU benchmark itself needs a CUDA GPU (and TensorRT for its TensorRT rows); this checks that
the script builds both architectures from their configs, counts FLOPs, measures a matmul rate
and prints its table, so that it is ready when a GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_gpu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
        check=False,
    )


def test_the_tiny_benchmark_prints_a_row_per_arch_batch_and_backend() -> None:
    result = bench_gpu("--tiny", "--repeats", "1", "--backends", "eager,tensorrt")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| sd")]
    cells = {tuple(cell.strip() for cell in (row[0], row[2], row[3])): row for row in rows}
    for arch in ("sd15", "sdxl"):
        gflops = {}
        for batch in ("1", "4"):
            row = cells[(arch, batch, "eager")]
            milliseconds, gflops[batch], floor = (float(row[index]) for index in (4, 5, 6))
            assert milliseconds > 0 and gflops[batch] > 0 and floor > 0
        # Every part of text->image (encoders, UNet, VAE) is linear in the batch.
        assert gflops["4"] == pytest.approx(4 * gflops["1"], rel=0.05)
        # No GPU is visible to it: TensorRT's rows say why they did not run and what to install.
        reason = cells[(arch, "-", "tensorrt")][4]
        assert "not run" in reason and "pip install tensorrt" in reason


def test_without_a_gpu_only_the_tiny_mode_runs() -> None:
    result = bench_gpu()
    assert result.returncode == 2 and "--tiny runs it on the CPU" in result.stderr
