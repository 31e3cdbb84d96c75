"""Data-parallel training under ``accelerate launch``, without DDP.

Each process draws its own batches (``process_seed``), the trained parameters' gradients are
averaged over processes every step (``average_gradients``), and the logged losses are the global
batch's (``mean_over_processes``). In one plain process every helper is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator

from training.devices import WeightDtype, resolve_device, torch_dtype

MixedPrecision = Literal["no", "bf16", "fp16"]


def make_accelerator(
    device_name: str, mixed_precision: MixedPrecision
) -> tuple[Accelerator, torch.device]:
    """This process's Accelerator and training device.

    One plain process trains on ``device_name`` (``cuda:N`` included); under ``accelerate
    launch`` each process takes the device the launcher gave it, of ``device_name``'s type.
    accelerate's state is one per process: a second run in the same process must keep the
    device type and ``mixed_precision``.
    """
    device = resolve_device(device_name)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    if accelerator.device.type != device.type:
        raise ValueError(
            f"device={device_name} but this process's accelerate state is on "
            f"{accelerator.device} (--cpu, or an earlier run in the same process)"
        )
    if accelerator.num_processes > 1:
        device = accelerator.device
    return accelerator, device


def compute_precision(weight_dtype: WeightDtype, mixed_precision: MixedPrecision) -> MixedPrecision:
    """The autocast a run needs: the frozen weights' half type whenever they are bf16 or fp16
    (their layers take fp32 inputs only under autocast), else ``mixed_precision``.

    Args:
        weight_dtype: the frozen weights' dtype: fp32, bf16 or fp16.
        mixed_precision: the autocast asked for: no, bf16 or fp16; with half weights it must be
            theirs (or no).
    """
    torch_dtype(weight_dtype)  # a ValueError listing the allowed values, for any other
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be one of no, bf16, fp16; got {mixed_precision!r}")
    if weight_dtype == "fp32":
        return mixed_precision
    if mixed_precision not in ("no", weight_dtype):
        raise ValueError(
            f"weight_dtype={weight_dtype} runs under {weight_dtype} autocast: mixed_precision "
            f"must be one of no, {weight_dtype}; got {mixed_precision!r}"
        )
    return weight_dtype


def autocast(device: torch.device, precision: MixedPrecision) -> torch.autocast:
    """The loops' autocast for ``precision`` (``compute_precision``) on ``device``'s type.

    torch's own rather than ``Accelerator.autocast``: accelerate runs fp16 natively only off
    the CPU, and the fp16 weights need the autocast on CPU too.

    Args:
        device: where the networks run.
        precision: no (a disabled autocast), bf16 or fp16.
    """
    if precision == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, torch_dtype(precision))


def process_seed(seed: int, rank: int) -> int:
    """``seed`` for process ``rank``: rank 0 keeps the single-process seed, every other rank
    hashes it with its index, so that each process draws its own batches and noise. A hash, not
    an offset: torch's CPU generator keeps only a seed's low 32 bits, so an offset above them
    would change nothing."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def average_gradients(accelerator: Accelerator, params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every process's gradients of ``params`` by their mean over processes.

    Data parallelism without DDP: the student stays the plain peft UNet that the objectives,
    the SDXL conditioning hooks, the online target and the sampler all use, and the discriminator
    heads' gradients are averaged only for their own step (DDP would also all-reduce the ones
    the student's adversarial loss leaves on them, which are dropped). One flat all-reduce per
    step does what DDP's would: with equal starting weights and equal mean gradients, every
    process's clipped AdamW step (and so its EMA target) is the same. A no-op in one process.
    """
    if accelerator.num_processes == 1:
        return
    # a parameter without a gradient joins as zeros: every process must send the same sizes
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    mean = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, g in zip(params, mean.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)


def mean_over_processes(
    accelerator: Accelerator, values: dict[str, float], device: torch.device
) -> dict[str, float]:
    """``values`` averaged over processes (e.g. the losses of the global batch)."""
    if accelerator.num_processes == 1:
        return values
    means = accelerator.reduce(torch.tensor(list(values.values()), device=device), reduction="mean")
    return dict(zip(values, means.tolist(), strict=True))
