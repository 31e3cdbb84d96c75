"""Shared pieces of the distillation objectives: the noise schedule's algebra, the DDIM step,
the classifier-free-guided teacher, consistency boundary scalings and distances.

Conventions (all objectives follow them):

* Timesteps are diffusers' integer training timesteps ``0 .. T-1`` (T = 1000 for SD1.5/SDXL and
  the Shapes model), one per sample, as a ``(N,)`` long tensor. The value ``CLEAN = -1`` means the
  clean end of the trajectory: its ᾱ is ``final_alpha_cumprod`` (1.0 by default, so x_{-1} = x0).
  This is where a DDIM "trailing" sampler's last step lands (it steps from 249 to -1 at 4 steps).
* ``alphas_cumprod`` is the scheduler's ᾱ_t table, shape ``(T,)`` (``scheduler.alphas_cumprod``).
* Networks predict epsilon and are called like diffusers' UNet2DConditionModel:
  ``unet(x_t, t, encoder_hidden_states).sample``.
* x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε  (the paper's and DDIM's notation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CLEAN = -1
"""The timestep that means "clean" (x0): ᾱ = ``final_alpha_cumprod``."""

Distance = Literal["mse", "huber"]

# Anything called like a diffusers UNet2DConditionModel: ``unet(x, t, encoder_hidden_states)``
# returning an object with ``.sample`` (an epsilon prediction).
EpsilonModel = Callable[..., Any]


def alphas_at(
    alphas_cumprod: Tensor, timesteps: Tensor, final_alpha_cumprod: float = 1.0
) -> Tensor:
    """ᾱ_t for each sample, shaped ``(N, 1, 1, 1)`` to broadcast over latents.

    Args:
        alphas_cumprod: the schedule's ᾱ table, ``(T,)``.
        timesteps: ``(N,)`` integer timesteps in ``[-1, T-1]``; -1 is ``CLEAN``.
        final_alpha_cumprod: ᾱ at ``CLEAN`` (1.0: x_{-1} is x0 itself).
    """
    table = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alphas = table[timesteps.long().clamp(min=0)]
    alphas = torch.where(timesteps < 0, torch.full_like(alphas, final_alpha_cumprod), alphas)
    return alphas.view(-1, 1, 1, 1)


def add_noise(
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: float = 1.0,
) -> Tensor:
    """The forward process q(x_t | x0): x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε.

    Args:
        x0: clean latents ``(N, C, H, W)``.
        noise: ε, same shape.
        timesteps: ``(N,)`` timesteps t (``CLEAN`` gives x0 back when ᾱ_final = 1).
        alphas_cumprod: the ᾱ table.
        final_alpha_cumprod: ᾱ at ``CLEAN``.
    """
    alpha = alphas_at(alphas_cumprod, timesteps, final_alpha_cumprod).to(x0.dtype)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def renoise(
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: float = 1.0,
) -> Tensor:
    """The forward kernel q(x_t | x_s) from a noise level s to a noisier t >= s.

    x_t = sqrt(ᾱ_t / ᾱ_s) x_s + sqrt(1 - ᾱ_t / ᾱ_s) ε; if x_s ~ q(x_s | x0) then x_t ~ q(x_t | x0).

    Args:
        x_s: latents at level s.
        s: ``(N,)`` their timesteps (``CLEAN`` allowed).
        t: ``(N,)`` target timesteps, each ``>= s``.
        noise: fresh ε, same shape as ``x_s``.
        alphas_cumprod: the ᾱ table.
        final_alpha_cumprod: ᾱ at ``CLEAN``.
    """
    if bool((t < s).any()):
        raise ValueError("renoise goes only towards more noise: every t must be >= s")
    ratio = alphas_at(alphas_cumprod, t, final_alpha_cumprod) / alphas_at(
        alphas_cumprod, s, final_alpha_cumprod
    )
    ratio = ratio.clamp(max=1.0).to(x_s.dtype)
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise


def x0_from_epsilon(
    x_t: Tensor, epsilon: Tensor, timesteps: Tensor, alphas_cumprod: Tensor
) -> Tensor:
    """x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) (timesteps must be >= 0)."""
    alpha = alphas_at(alphas_cumprod, timesteps).to(x_t.dtype)
    return (x_t - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()


def ddim_step(
    x_t: Tensor,
    epsilon: Tensor,
    t: Tensor,
    s: Tensor,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: float = 1.0,
) -> Tensor:
    """The deterministic DDIM (η = 0) step from t to any s < t, ``CLEAN`` included.

    x_s = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s) ε̂ with x̂0 = x0_from_epsilon(x_t, ε̂, t). With s = t it
    gives x_t back; with s = ``CLEAN`` (and ᾱ_final = 1) it gives x̂0.

    Args:
        x_t: latents at t, ``(N, C, H, W)``.
        epsilon: ε̂, the epsilon prediction at (x_t, t).
        t: ``(N,)`` current timesteps (>= 0).
        s: ``(N,)`` destination timesteps (<= t; ``CLEAN`` allowed).
        alphas_cumprod: the ᾱ table.
        final_alpha_cumprod: ᾱ at ``CLEAN``.
    """
    x0 = x0_from_epsilon(x_t, epsilon, t, alphas_cumprod)
    alpha_s = alphas_at(alphas_cumprod, s, final_alpha_cumprod).to(x_t.dtype)
    return alpha_s.sqrt() * x0 + (1 - alpha_s).sqrt() * epsilon


def guided_epsilon(
    unet: EpsilonModel,
    x_t: Tensor,
    timesteps: Tensor,
    encoder_hidden_states: Tensor,
    uncond_hidden_states: Tensor | None = None,
    guidance: Tensor | float | None = None,
) -> Tensor:
    """The teacher's classifier-free-guided epsilon, ε_u + ω (ε_c - ε_u), with a per-sample ω.

    LCM writes the same thing as ε_c + w (ε_c - ε_u): pass ω = 1 + w.

    Args:
        unet: the epsilon network.
        x_t: noisy latents ``(N, C, H, W)``.
        timesteps: ``(N,)`` timesteps (>= 0).
        encoder_hidden_states: the caption's text embeddings ``(N, L, D)``.
        uncond_hidden_states: the empty caption's embeddings, ``(N, L, D)`` or ``(1, L, D)``;
            None (or ω None) runs the conditional prediction only.
        guidance: ω, a float or an ``(N,)`` tensor.
    """
    if uncond_hidden_states is None or guidance is None:
        return unet(x_t, timesteps, encoder_hidden_states).sample
    n = x_t.shape[0]
    uncond = uncond_hidden_states.expand(n, *uncond_hidden_states.shape[1:])
    both = unet(
        torch.cat([x_t, x_t]),
        torch.cat([timesteps, timesteps]),
        torch.cat([uncond.to(encoder_hidden_states.dtype), encoder_hidden_states]),
    ).sample
    eps_uncond, eps_cond = both.chunk(2)
    omega = torch.as_tensor(guidance, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1, 1)
    return eps_uncond + omega * (eps_cond - eps_uncond)


def sample_guidance(
    batch: int,
    guidance_range: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """ω ~ U[ω_min, ω_max] per sample, ``(N,)``."""
    low, high = guidance_range
    u = torch.rand(batch, generator=generator, device=generator.device if generator else device)
    return (low + (high - low) * u).to(device)


def scalings_for_boundary_conditions(
    timesteps: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """LCM's consistency-model boundary scalings (c_skip, c_out) at ``timestep_scaling * t``.

    c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / sqrt((s t)² + σ_d²): at t = 0, c_skip = 1 and
    c_out = 0, so f(x, 0) = x. Shaped ``(N, 1, 1, 1)``.
    """
    scaled = timestep_scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def pseudo_huber(prediction: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """mean(sqrt((a - b)² + c²) - c): LCM's Huber loss; ~ |a - b| far, ~ (a - b)² / 2c near."""
    diff = prediction.float() - target.float()
    return torch.mean(torch.sqrt(diff**2 + c**2) - c)


def distance(
    prediction: Tensor, target: Tensor, kind: Distance = "mse", c: float = 0.001
) -> Tensor:
    """The consistency distance d(a, b): ``"mse"`` (mean squared) or ``"huber"`` (pseudo-Huber)."""
    if kind == "mse":
        return F.mse_loss(prediction.float(), target.float())
    if kind == "huber":
        return pseudo_huber(prediction, target, c)
    raise ValueError(f"unknown distance {kind!r}: expected 'mse' or 'huber'")


def offset_noise(
    like: Tensor, strength: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian noise plus ``strength`` times a per-sample, per-channel constant (offset noise).

    Hyper-SD's "noise perturbation": the offset lets the model change an image's mean colour,
    which pure white noise never asks it to do. ``strength = 0`` is plain ε ~ N(0, I).

    Args:
        like: a tensor giving the shape, dtype and device.
        strength: the offset's scale (0.05–0.1 is usual).
        generator: the random source (its device must match ``like``'s).
    """
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if strength:
        offset = torch.randn(
            (like.shape[0], like.shape[1], 1, 1),
            generator=generator,
            device=like.device,
            dtype=like.dtype,
        )
        noise = noise + strength * offset
    return noise


def uniform_timesteps(
    batch: int,
    low: int,
    high: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(N,)`` integer timesteps uniform in ``[low, high]`` (both included)."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(low, high + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device)
