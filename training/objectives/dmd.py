"""Distribution matching distillation for the one-step model (DMD2, Yin et al. 2024).

The student's one-step output x is noised to a random t; the real score (the teacher, guided)
and the fake score (a network that tracks the student's own output distribution) each predict
x0 from it. Their difference is the KL gradient between the student's and the data's
distributions; DMD2 normalises it per sample and turns it into a loss whose gradient it is:
``0.5 * mse(x, (x - grad).detach())``. The fake score is trained meanwhile with the ordinary
diffusion loss on detached student outputs (several fake updates per student update).

DMD2's GAN term (``gan_*``): a discriminator of heads over the fake score's features classifies
real latents against the student's outputs, both noised to one t; the heads (and the fake
score's LoRA) learn with the fake score's updates, and the student pushes its logits up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.objectives.adversarial import (
    GanLoss,
    TeacherFeatureDiscriminator,
    discriminator_losses,
    generator_adversarial_losses,
)
from training.objectives.solvers import (
    EpsilonModel,
    add_noise,
    guided_epsilon,
    uniform_timesteps,
    x0_from_epsilon,
)


def dmd_losses(
    generated: Tensor,
    teacher: EpsilonModel,
    fake_score: EpsilonModel,
    alphas_cumprod: Tensor,
    encoder_hidden_states: Tensor,
    *,
    uncond_hidden_states: Tensor | None = None,
    guidance: float | Tensor | None = None,
    min_step_fraction: float = 0.02,
    max_step_fraction: float = 0.98,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The distribution matching loss on the student's one-step outputs (DMD2's generator loss).

    With x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε at t ~ U[0.02 T, 0.98 T], x̂0_real from the guided
    teacher and x̂0_fake from the fake score (both without grad):
    grad = (x̂0_fake - x̂0_real) / mean(|x - x̂0_real|) per sample, and
    loss = 0.5 · mse(x, (x - grad).detach()), so a descent step moves x towards x̂0_real and
    away from x̂0_fake.

    Args:
        generated: x, the student's one-step latents ``(N, C, H, W)`` (keeps its graph).
        teacher: the real score μ_real (the frozen base model).
        fake_score: the fake score μ_fake (a LoRA copy of the teacher, trained alongside).
        alphas_cumprod: the ᾱ table.
        encoder_hidden_states: the captions' embeddings ``(N, L, D)``.
        uncond_hidden_states: the empty caption's embeddings for the teacher's CFG.
        guidance: the real score's CFG scale ω (DMD2 uses ~8 for SDXL); None for no guidance.
        min_step_fraction: t's lower bound as a fraction of T.
        max_step_fraction: t's upper bound as a fraction of T.
        noise: ε (drawn when None).
        timesteps: fixed ``(N,)`` timesteps (drawn when None).
        generator: the random source.

    Returns ``loss``, and diagnostics ``grad_norm`` (mean |grad|), ``t`` (mean timestep) and
    ``real_fake_gap`` (mean |x̂0_real - x̂0_fake|).
    """
    n, device = generated.shape[0], generated.device
    T = alphas_cumprod.shape[0]
    if timesteps is None:
        low, high = int(min_step_fraction * T), min(int(max_step_fraction * T), T - 1)
        timesteps = uniform_timesteps(n, low, high, generator, device)
    if noise is None:
        noise = torch.randn(
            generated.shape, generator=generator, device=device, dtype=generated.dtype
        )
    x = generated
    with torch.no_grad():
        noisy = add_noise(x.detach(), noise, timesteps, alphas_cumprod)
        eps_fake = fake_score(noisy, timesteps, encoder_hidden_states).sample
        pred_fake_image = x0_from_epsilon(noisy, eps_fake, timesteps, alphas_cumprod)
        eps_real = guided_epsilon(
            teacher, noisy, timesteps, encoder_hidden_states, uncond_hidden_states, guidance
        )
        pred_real_image = x0_from_epsilon(noisy, eps_real, timesteps, alphas_cumprod)
        p_real = x.detach() - pred_real_image
        normalizer = torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
        grad = (pred_fake_image - pred_real_image) / normalizer
        grad = torch.nan_to_num(grad)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")
    return {
        "loss": loss,
        "grad_norm": grad.abs().mean(),
        "t": timesteps.float().mean(),
        "real_fake_gap": (pred_real_image - pred_fake_image).abs().mean(),
    }


def fake_score_losses(
    fake_score: EpsilonModel,
    generated: Tensor,
    alphas_cumprod: Tensor,
    encoder_hidden_states: Tensor,
    *,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The fake score's own diffusion loss on *detached* student outputs: mse(ε̂_fake, ε).

    Args:
        fake_score: μ_fake, the network being trained here.
        generated: the student's one-step latents (detached here: the student gets no grad).
        alphas_cumprod: the ᾱ table.
        encoder_hidden_states: the captions' embeddings.
        noise: ε (drawn when None).
        timesteps: fixed ``(N,)`` timesteps (uniform over [0, T-1] when None).
        generator: the random source.

    Returns ``loss`` (= ``mse``).
    """
    x = generated.detach()
    n, device = x.shape[0], x.device
    T = alphas_cumprod.shape[0]
    if timesteps is None:
        timesteps = uniform_timesteps(n, 0, T - 1, generator, device)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    noisy = add_noise(x, noise, timesteps, alphas_cumprod)
    prediction = fake_score(noisy, timesteps, encoder_hidden_states).sample
    mse = F.mse_loss(prediction.float(), noise.float())
    return {"loss": mse, "mse": mse}


def _gan_timesteps(
    latents: Tensor, alphas_cumprod: Tensor, generator: torch.Generator | None
) -> Tensor:
    """The GAN term's t ~ U{0, ..., T-1}, one per sample (DMD2's classifier sees every level)."""
    T = alphas_cumprod.shape[0]
    return uniform_timesteps(latents.shape[0], 0, T - 1, generator, latents.device)


def gan_generator_losses(
    discriminator: TeacherFeatureDiscriminator,
    generated: Tensor,
    alphas_cumprod: Tensor,
    encoder_hidden_states: Tensor,
    *,
    kind: GanLoss = "non-saturating",
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The student's GAN term (DMD2): its outputs noised to t, scored by the heads.

    Args:
        discriminator: the heads over the fake score's features.
        generated: the student's latents ``(N, C, H, W)`` (keeps its graph: the loss's gradient
            reaches the student through the fake score).
        alphas_cumprod: the ᾱ table.
        encoder_hidden_states: the captions' embeddings.
        kind: ``"non-saturating"`` (DMD2: softplus(-D(fake))) or ``"hinge"`` (-D(fake)).
        noise: ε (drawn when None).
        timesteps: fixed ``(N,)`` timesteps (uniform over [0, T-1] when None).
        generator: the random source.

    Returns ``loss`` and ``fake_logit`` (the mean logit, detached).
    """
    if timesteps is None:
        timesteps = _gan_timesteps(generated, alphas_cumprod, generator)
    if noise is None:
        noise = torch.randn(
            generated.shape, generator=generator, device=generated.device, dtype=generated.dtype
        )
    noisy = add_noise(generated, noise, timesteps, alphas_cumprod)
    return generator_adversarial_losses(
        discriminator, noisy, timesteps, encoder_hidden_states, kind
    )


def gan_discriminator_losses(
    discriminator: TeacherFeatureDiscriminator,
    generated: Tensor,
    real_latents: Tensor,
    alphas_cumprod: Tensor,
    encoder_hidden_states: Tensor,
    *,
    kind: GanLoss = "non-saturating",
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The discriminator's GAN loss (DMD2's classifier): real against the student's outputs.

    Both are noised to the same t (each with its own ε), so that the heads compare them at one
    noise level; the student's outputs are detached (its update is the generator loss's).

    Args:
        discriminator: the heads over the fake score's features (the loss reaches the heads and
            any trainable weights of the fake score).
        generated: the student's latents (detached here).
        real_latents: the real class, clean latents (Shapes renders) of the same shape.
        alphas_cumprod: the ᾱ table.
        encoder_hidden_states: the captions' embeddings (the real latents' captions).
        kind: ``"non-saturating"`` (DMD2's softplus pair) or ``"hinge"``.
        noise: ``(2, N, C, H, W)``: ε for the real, then the generated latents (drawn when None).
        timesteps: fixed ``(N,)`` timesteps (uniform over [0, T-1] when None).
        generator: the random source.

    Returns ``loss``, and the mean ``real_logit`` / ``fake_logit`` as diagnostics.
    """
    fake = generated.detach()
    if noise is None:
        noise = torch.randn((2, *fake.shape), generator=generator, device=fake.device)
    if timesteps is None:
        timesteps = _gan_timesteps(fake, alphas_cumprod, generator)
    real_noisy = add_noise(real_latents, noise[0], timesteps, alphas_cumprod)
    fake_noisy = add_noise(fake, noise[1], timesteps, alphas_cumprod)
    return discriminator_losses(
        discriminator, real_noisy, fake_noisy, timesteps, encoder_hidden_states, kind
    )
