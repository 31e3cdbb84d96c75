"""The trained parameters' optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW.

8-bit AdamW keeps Adam's two moments in 8 bits (blockwise quantised), 2 bytes per parameter
instead of 8 (``training.memory`` estimates what that saves for a config). The parameters
themselves, and their gradients, stay fp32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Literal

import torch

OptimizerKind = Literal["adamw", "adamw8bit"]


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    kind: OptimizerKind,
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW over ``params``.

    Args:
        params: the trained parameters (fp32).
        kind: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, which must be installed).
        lr: the learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam's moment decays.
    """
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if kind == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, on a CUDA "
                "machine); or use optimizer=adamw"
            )
        import bitsandbytes as bnb  # optional: GPU machines

        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(
            params, lr=lr, weight_decay=weight_decay, betas=betas
        )
        return optimizer
    raise ValueError(f"optimizer must be one of adamw, adamw8bit; got {kind!r}")
