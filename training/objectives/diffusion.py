"""The objectives that train the Shapes base model: the autoencoder's and the denoiser's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler


def autoencoder_losses(
    vae: AutoencoderKL, images: torch.Tensor, kl_weight: float
) -> dict[str, torch.Tensor]:
    """Reconstruction (L1 + MSE, on images in [-1, 1]) plus a small KL term.

    L1 keeps the flat colours and hard edges of the Shapes world sharp; the KL
    weight is tiny, as in SD's autoencoder, so the latent stays informative.
    """
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    losses = reconstruction_losses(reconstruction, images)
    kl = posterior.kl().mean() / images[0].numel()
    return {**losses, "loss": losses["loss"] + kl_weight * kl, "kl": kl}


def reconstruction_losses(
    reconstruction: torch.Tensor, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """L1 + MSE between a decoded image and its target, both in [-1, 1]."""
    l1 = F.l1_loss(reconstruction, images)
    mse = F.mse_loss(reconstruction, images)
    return {"loss": l1 + mse, "l1": l1, "mse": mse}


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction (Hang et al. 2023): min(SNR, γ) / SNR."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def denoising_losses(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    min_snr_gamma: float | None = 5.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The epsilon-prediction diffusion loss at uniformly drawn timesteps.

    Args:
        unet: the denoiser being trained.
        scheduler: gives the noise schedule (alphas_cumprod) and ``add_noise``.
        latents: clean latents, already multiplied by the VAE's scaling factor.
        text_embeddings: the text encoder's last hidden states for each latent.
        min_snr_gamma: weight timesteps by min(SNR, γ)/SNR; None for the plain mean.
        generator: the random source for noise and timesteps.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(
        0,
        scheduler.config["num_train_timesteps"],
        (latents.shape[0],),
        generator=generator,
        device=latents.device,
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)  # type: ignore[arg-type]  # any int tensor
    prediction = unet(noisy, timesteps, text_embeddings).sample
    per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
    plain = per_sample.mean()
    if min_snr_gamma is None:
        return {"loss": plain, "mse": plain}
    weighted = (per_sample * min_snr_weights(scheduler, timesteps, min_snr_gamma)).mean()
    return {"loss": weighted, "mse": plain}
