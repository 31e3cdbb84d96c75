"""Sampling during training, always the way the service samples.

``trailing_timesteps`` is the served DDIM-trailing schedule, ``sample_x0`` its DDIM steps on
latents (with grad, inside a loss), ``sample_grid_from`` a grid of images through the diffusers
pipeline itself, and ``adapters_off`` the stage's starting model (its new LoRA switched off).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from torch import Tensor

from hypersd.lora import SDPipeline
from hypersd.pipeline import build_scheduler
from hypersd.recipes import RECIPES
from training.base import save_grid
from training.objectives.solvers import ddim_step, x0_from_epsilon

Sampler = Literal["ddim-trailing", "lcm"]


@functools.cache
def trailing_timesteps(num_train_timesteps: int, steps: int) -> tuple[int, ...]:
    """The served sampler's timesteps (DDIM, trailing spacing): e.g. 1000, 4 -> 999, 749, 499,
    249. Asked by the diffusers scheduler itself, so training follows the served schedule."""
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return tuple(int(t) for t in scheduler.timesteps)


def sample_x0(
    unet: UNet2DConditionModel,
    noise: Tensor,
    text: Tensor,
    alphas: Tensor,
    timesteps: Sequence[int],
) -> Tensor:
    """x̂0 of DDIM from ``noise`` through ``timesteps`` (no CFG, as served): the trailing
    schedule of an N-step model, or ``(t,)`` for a 1-step model labelling pure noise t."""
    x = noise
    for i, step_t in enumerate(timesteps):
        t = torch.full((noise.shape[0],), step_t, device=noise.device, dtype=torch.long)
        eps = unet(x, t, text).sample
        x0 = x0_from_epsilon(x, eps, t, alphas)
        if i + 1 < len(timesteps):
            s = torch.full_like(t, timesteps[i + 1])
            x = ddim_step(x, eps, t, s, alphas)
    return x0


@contextlib.contextmanager
def adapters_off(unet: UNet2DConditionModel) -> Iterator[None]:
    """The UNet without its LoRA adapter: the stage's starting model."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def sample_grid_from(
    pipe: SDPipeline,
    unet: UNet2DConditionModel,
    captions: list[str],
    steps: int,
    resolution: int,
    path: Path,
    sampler: Sampler = "ddim-trailing",
    timesteps: tuple[int, ...] | None = None,
) -> None:
    """A grid of ``unet``'s images, one per caption (seed = index), no CFG; ``timesteps``
    overrides the sampler's spacing (e.g. (800,): one step from t = 800)."""
    scheduler: DDIMScheduler | LCMScheduler
    if sampler == "lcm":
        scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    else:
        built = build_scheduler(RECIPES["nstep-lora"], pipe.scheduler.config)
        assert isinstance(built, DDIMScheduler)
        scheduler = built
    components: dict[str, Any] = {**pipe.components, "unet": unet, "scheduler": scheduler}
    if isinstance(pipe, StableDiffusionXLPipeline):
        sampling: SDPipeline = StableDiffusionXLPipeline(**components)
    else:
        sampling = StableDiffusionPipeline(**components, requires_safety_checker=False)
    sampling.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        images = sampling(
            prompt=captions,
            num_inference_steps=None if timesteps else steps,
            timesteps=list(timesteps) if timesteps else None,
            guidance_scale=0.0,
            generator=generators,
            height=resolution,
            width=resolution,
        ).images
    unet.train(was_training)
    save_grid(images, path, columns=min(8, len(images)))
