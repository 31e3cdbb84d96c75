"""``python -m bench.gpu_training`` runs end to end: here in its ``--tiny`` mode, on the CPU.

The benchmark proper (SDXL architecture at 1024², batch 2, bf16) needs a CUDA GPU; this runs the
same three steps (the training loops' own step functions, bf16 frozen weights, fp32 LoRAs,
gradient checkpointing) on tiny random SDXL-architecture networks and checks the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_benchmark_prints_a_row_per_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_training", "--tiny", "--steps", "2"],
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = re.findall(r"^\| (\w+) \| ([0-9.]+) \| (.+) \|$", result.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["tscd", "feedback", "dmd"]
    assert all(float(seconds) > 0 for _, seconds, _ in rows)
    assert all(memory == "not measured (CPU)" for _, _, memory in rows)
    assert "SDXL architecture (tiny), 64², batch 2, bf16 weights" in result.stdout
