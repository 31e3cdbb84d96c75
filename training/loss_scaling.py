"""One optimiser's update with fp16 loss scaling: backward, average, unscale, clip, step.

fp16 (``weight_dtype: fp16``) runs the networks under fp16 autocast: the gradients flowing back
through the frozen fp16 layers would underflow (a per-element-mean loss over a batch of latents
gives ~1e-7 per element, below fp16's normal range), so the loss is multiplied by a scale
before ``backward`` and the LoRA's fp32 gradients divided by it before clipping and the step
(``torch.amp.GradScaler``). A step whose gradients hold inf or nan is skipped and the scale
halved; ``skipped`` counts them, so that the learning-rate schedule follows the updates made
(as accelerate's scheduler wrapper does) and the EMA target stays put. The scale, its growth
tracker and ``skipped`` are in every checkpoint (``training.checkpoint``), so a resumed run
goes on with the scale it had. Without fp16 the scaler is disabled and ``update`` is the plain
backward, average, clip and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator

from training.distributed import MixedPrecision, average_gradients


class LossScaler:
    """One optimiser's loss scaling (enabled for fp16), and the count of its skipped steps.

    Args:
        device: where the networks run (the scaler's device type).
        precision: the run's autocast (``compute_precision``); fp16 enables the scaling.
        init_scale: the first scale (GradScaler's default, 2**16); a loss far above 1 (the
            feedback rewards) overflows at it and spends its first steps halving it.
    """

    def __init__(
        self, device: torch.device, precision: MixedPrecision, init_scale: float = 2.0**16
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"the initial loss scale must be > 0; got {init_scale}")
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=init_scale, enabled=precision == "fp16"
        )
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.scaler.is_enabled()

    def update(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        accelerator: Accelerator,
        grad_clip: float | None = None,
    ) -> bool:
        """One optimiser step on ``loss``; False if it was skipped (inf or nan gradients).

        Args:
            loss: the (unscaled) loss to minimise.
            optimizer: the optimiser stepping ``params``.
            params: the trained parameters, whose gradients are averaged over processes and
                clipped.
            accelerator: this process's Accelerator (the gradients' all-reduce).
            grad_clip: the gradients' maximum total norm (after unscaling); None: no clipping.
        """
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # averaged while still scaled: an inf in any process reaches every process's mean, so
        # every process skips the same steps and the weights stay equal
        average_gradients(accelerator, params)
        if not self.enabled:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # the scale falls only when the step found inf or nan gradients and was skipped
        applied = self.scaler.get_scale() >= scale
        if not applied:
            self.skipped += 1
        return applied

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker, factors) and ``skipped``: JSON values."""
        return {**self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s values ``state`` (a disabled scaler keeps only
        ``skipped``)."""
        state = dict(state)
        self.skipped = int(state.pop("skipped", 0))
        if state:
            self.scaler.load_state_dict(state)
