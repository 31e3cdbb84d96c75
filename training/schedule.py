"""The learning-rate schedule every training loop uses: linear warm-up, then constant or cosine."""

from __future__ import annotations

import math
from typing import Literal

LrSchedule = Literal["constant", "cosine"]


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: LrSchedule = "cosine",
    floor: float = 0.0,
) -> float:
    """The learning rate at ``step`` as a fraction of the base rate.

    Args:
        step: the update about to be made (0-based).
        warmup_steps: updates of linear warm-up from ``1 / warmup_steps`` to 1.
        total_steps: the run's length; the cosine reaches ``floor`` there.
        schedule: after the warm-up, ``"constant"`` (1, the LCM scripts' schedule) or
            ``"cosine"`` (decay to ``floor``).
        floor: the cosine's final factor (ignored by ``"constant"``).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
