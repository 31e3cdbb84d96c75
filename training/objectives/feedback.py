"""Human-feedback learning (Hyper-SD §3.2): ReFL-style reward and structure losses.

The student denoises to a random t inside a window and predicts x0 in one step with grad; a
reward model scores the decoded x̂0 against its caption and L = E[ReLU(α - r(x̂0, c))]. For
structure, a *rendered* image is diffused to such a t, the student predicts x̂0, and an
instance-segmentation network's masks on the decoded x̂0 are compared with the render's
ground-truth masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from training.objectives.solvers import (
    EpsilonModel,
    add_noise,
    ddim_step,
    uniform_timesteps,
    x0_from_epsilon,
)

RewardFn = Callable[[Tensor, Sequence[Any]], Tensor]
"""r(images, captions) -> ``(N,)`` rewards, differentiable in the images (e.g.
``AttributeNet.log_prob``, images ``(N, 3, H, W)`` in [0, 1])."""

SegmentationFn = Callable[[Tensor], Tensor]
"""images ``(N, 3, H, W)`` -> ``(N, M, H', W')`` per-instance mask probabilities (or logits)."""


def refl_loss(
    x0_images: Tensor, captions: Sequence[Any], reward_fn: RewardFn, alpha: float
) -> dict[str, Tensor]:
    """L_aes = mean(ReLU(α - r(x̂0, c))): push each image's reward up to the margin α, no further.

    Args:
        x0_images: the decoded x̂0 predictions, in the range the reward expects (keep the graph).
        captions: one caption (or scene) per image.
        reward_fn: r, differentiable in the images.
        alpha: α, the reward margin above which an image costs nothing.

    Returns ``loss`` and ``reward`` (mean r, detached).
    """
    reward = reward_fn(x0_images, captions)
    loss = F.relu(alpha - reward).mean()
    return {"loss": loss, "reward": reward.detach().mean()}


@dataclass(frozen=True)
class RewardTerm:
    """One reward of the feedback loss: its name (for the log), r, its weight w and margin α."""

    name: str
    reward_fn: RewardFn
    weight: float
    margin: float


def feedback_losses(
    x0_images: Tensor, captions: Sequence[Any], terms: Sequence[RewardTerm]
) -> dict[str, Tensor]:
    """L = Σ_r w_r · mean(ReLU(α_r - r(x̂0, c))) over the reward terms (``refl_loss`` each).

    Returns ``loss``, and for each term ``<name>_loss`` (detached) and ``<name>_reward``.
    """
    out: dict[str, Tensor] = {}
    total = x0_images.new_zeros(())
    for term in terms:
        refl = refl_loss(x0_images, captions, term.reward_fn, term.margin)
        total = total + term.weight * refl["loss"]
        out[f"{term.name}_loss"] = refl["loss"].detach()
        out[f"{term.name}_reward"] = refl["reward"]
    out["loss"] = total
    return out


def dice_loss(probabilities: Tensor, masks: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2 Σ p m + s) / (Σ p + Σ m + s) per instance mask, averaged: 0 for perfect masks."""
    dims = (-2, -1)
    intersection = (probabilities * masks).sum(dims)
    total = probabilities.sum(dims) + masks.sum(dims)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def structure_loss(
    x0_images: Tensor,
    target_masks: Tensor,
    segmentation_fn: SegmentationFn,
    *,
    from_logits: bool = False,
    dice_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Per-pixel BCE + dice between the segmentation of x̂0 and the render's true masks.

    Mask m of the network's output is compared with ground-truth mask m (the caller orders the
    ground truth the way the network's slots are defined, e.g. one slot per object).

    Args:
        x0_images: the decoded x̂0 of the diffused-then-denoised rendered image (keep the graph).
        target_masks: ``(N, M, H', W')`` ground-truth masks in {0, 1} (resized when the
            network's output resolution differs).
        segmentation_fn: the (frozen) instance-segmentation network.
        from_logits: whether the network returns logits rather than probabilities.
        dice_weight: the dice term's weight.

    Returns ``loss`` (= ``bce`` + dice_weight · ``dice``), ``bce``, ``dice``.
    """
    output = segmentation_fn(x0_images).float()
    masks = target_masks.to(output.dtype)
    if masks.shape[-2:] != output.shape[-2:]:
        masks = F.interpolate(masks, size=output.shape[-2:], mode="nearest")
    if from_logits:
        bce = F.binary_cross_entropy_with_logits(output, masks)
        probabilities = output.sigmoid()
    else:
        probabilities = output.clamp(0.0, 1.0)
        bce = F.binary_cross_entropy(probabilities, masks)
    dice = dice_loss(probabilities, masks)
    return {"loss": bce + dice_weight * dice, "bce": bce.detach(), "dice": dice.detach()}


def noised_x0_prediction(
    student: EpsilonModel,
    alphas_cumprod: Tensor,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    *,
    window: tuple[int, int],
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Diffuse clean (rendered) latents to t ~ U[window] and predict x̂0 with the student.

    Args:
        student: the network being trained (its prediction keeps the graph).
        alphas_cumprod: the ᾱ table.
        latents: clean latents of real images ``(N, C, H, W)``.
        encoder_hidden_states: their captions' embeddings.
        window: (t_low, t_high), both included.
        noise: ε (drawn when None).
        generator: the random source.

    Returns ``(x0_prediction, timesteps)``.
    """
    n, device = latents.shape[0], latents.device
    t = uniform_timesteps(n, window[0], window[1], generator, device)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    x_t = add_noise(latents, noise, t, alphas_cumprod)
    eps = student(x_t, t, encoder_hidden_states).sample
    return x0_from_epsilon(x_t, eps, t, alphas_cumprod), t


def denoised_x0_prediction(
    student: EpsilonModel,
    alphas_cumprod: Tensor,
    noise: Tensor,
    encoder_hidden_states: Tensor,
    *,
    schedule: Sequence[int],
    stop_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, int]:
    """ReFL: run the student's DDIM sampler from pure noise without grad to a random step of
    ``schedule``, then predict x̂0 there in one step with grad.

    Args:
        student: the network being trained.
        alphas_cumprod: the ᾱ table.
        noise: x_T ~ N(0, I), ``(N, C, H, W)``.
        encoder_hidden_states: the captions' embeddings.
        schedule: the sampler's descending timesteps, e.g. trailing ``[999, 749, 499, 249]``.
        stop_range: (first, last) indices into ``schedule`` to stop at (both included; the
            window of t); all indices when None.
        generator: the random source.

    Returns ``(x0_prediction, x_t, t)``: x_t (no grad) is where x̂0 was predicted, at timestep t,
    so that a reference network (e.g. the starting model) can predict from the same point.
    """
    first, last = stop_range if stop_range is not None else (0, len(schedule) - 1)
    n, device = noise.shape[0], noise.device
    # drawn on the generator's device (a CUDA generator on a GPU), read back to the host
    stop = int(uniform_timesteps(1, first, last, generator, device)[0])
    x = noise
    with torch.no_grad():
        for i in range(stop):
            t = torch.full((n,), schedule[i], device=device, dtype=torch.long)
            s = torch.full((n,), schedule[i + 1], device=device, dtype=torch.long)
            eps = student(x, t, encoder_hidden_states).sample
            x = ddim_step(x, eps, t, s, alphas_cumprod)
    t = torch.full((n,), schedule[stop], device=device, dtype=torch.long)
    x = x.detach()
    eps = student(x, t, encoder_hidden_states).sample
    return x0_from_epsilon(x, eps, t, alphas_cumprod), x, schedule[stop]


def latents_to_images(vae: Any, latents: Tensor) -> Tensor:
    """Decode latents (scaled by the VAE factor) to images in [0, 1], keeping the graph."""
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return ((decoded.float() + 1) / 2).clamp(0.0, 1.0)
