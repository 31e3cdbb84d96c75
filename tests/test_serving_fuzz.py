"""Fuzz proof, short (issue 11): schemathesis against the live spec of a real gateway, worker and
Redis finds no 5xx and no answer off the spec (status codes included). `make fuzz` runs the long
version (>= 2,000 requests, bench/results/fuzz-cpu.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_generated_requests_get_no_5xx_and_only_answers_the_spec_declares() -> None:
    command = [sys.executable, "-m", "bench.fuzz", "--max-examples", "12", "--seed", "7"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(re.findall(r"^\| (\d+) \| (\d+) \|$", done.stdout, re.MULTILINE))
    total = int(re.findall(r"\| \*\*all\*\* \| \*\*(\d+)\*\* \|", done.stdout)[0])
    assert total == sum(int(count) for count in rows.values()) >= 250, done.stdout
    assert not [status for status in rows if int(status) >= 500], done.stdout
    assert "**passed**" in done.stdout
