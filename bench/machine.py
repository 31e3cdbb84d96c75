"""One line that says what a benchmark ran on: CPU model and count, torch, and the GPU if any."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_machine(device: torch.device | str | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    text = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)"
    if device is not None and torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text
