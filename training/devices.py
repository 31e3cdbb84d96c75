"""Where training and evaluation run: one way to name a device, one way to move a module."""

from __future__ import annotations

import re
from typing import TypeVar

import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str | None) -> torch.device:
    """``auto`` or None: CUDA when there is a GPU, else CPU; or ``cpu``, ``cuda``, ``cuda:N``."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N; got {name!r}")
    return torch.device(name)


def to_device(module: ModuleT, device: torch.device) -> ModuleT:
    """``module.to(device)``, typed as the module: diffusers' decorated ``to`` confuses mypy."""
    module.to(device)
    return module
