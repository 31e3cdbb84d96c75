"""Where training and evaluation run: one way to name a device, one way to move a module, one
way to name the frozen weights' dtype."""

from __future__ import annotations

import re
from typing import Literal, TypeVar

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


def to_device(module: ModuleT, device: torch.device, dtype: torch.dtype | None = None) -> ModuleT:
    """``module.to(device)`` (and to ``dtype`` if given), typed as the module: diffusers'
    decorated ``to`` confuses mypy."""
    if dtype is None:
        module.to(device)
    else:
        # nn.Module's own ``to``: diffusers' warns on every cast about "modules to keep in
        # float32", a list that is empty for the UNets and VAEs trained here
        torch.nn.Module.to(module, device, dtype)
    return module


# The frozen networks' dtype (the trained LoRAs stay fp32). fp16 runs with loss scaling
# (``training.loss_scaling``): the gradients of the loops' per-element-mean losses (an MSE over
# 8 x 4 x 128 x 128 latents: ~1e-7 per element) fall below fp16's normal range unscaled.
WeightDtype = Literal["fp32", "bf16", "fp16"]
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def torch_dtype(name: WeightDtype) -> torch.dtype:
    """The torch dtype of a ``weight_dtype`` setting ``name``: fp32, bf16 or fp16."""
    if name not in _TORCH_DTYPES:
        raise ValueError(f"weight_dtype must be one of fp32, bf16, fp16; got {name!r}")
    return _TORCH_DTYPES[name]
