"""The adversarial term of TSCD: small trainable heads over the frozen teacher UNet's features.

As in PCM (Hyper-SD's closest open relative): the teacher UNet is a frozen feature extractor;
a small conv head on the output of every down, mid and up block gives per-location logits; real
and fake latents are re-noised to a time inside the current segment before the teacher sees
them; the losses are hinge losses; discriminator and student update on alternate steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor, nn

from training.objectives.solvers import add_noise, renoise

ADVERSARIAL_WEIGHTS: Mapping[int, float] = MappingProxyType({8: 0.05, 4: 0.05, 2: 0.2, 1: 0.5})
"""λ_adv by the number of segments k: mostly the consistency distance at 8 and 4 segments, more
adversarial at 2 and 1 (Hyper-SD §3.1). Starting points, to tune on the Shapes table."""


GanLoss = Literal["hinge", "non-saturating"]
"""The adversarial loss pair: hinge (PCM's, TSCD's) or non-saturating softplus (DMD2's)."""


def adversarial_weight(k: int) -> float:
    """λ_adv for stage k (``ADVERSARIAL_WEIGHTS``; 0 for an unlisted k)."""
    return ADVERSARIAL_WEIGHTS.get(k, 0.0)


def _logit_list(logits: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [logits] if isinstance(logits, Tensor) else list(logits)


def discriminator_hinge_loss(
    real_logits: Tensor | Sequence[Tensor], fake_logits: Tensor | Sequence[Tensor]
) -> Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), averaged over heads.

    Zero once real logits are >= 1 and fake logits <= -1. Each argument is one logit tensor or
    one per discriminator head.
    """
    real, fake = _logit_list(real_logits), _logit_list(fake_logits)
    if len(real) != len(fake) or not real:
        raise ValueError("need the same, non-zero number of real and fake logit tensors")
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def generator_hinge_loss(fake_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """-mean(D(fake)), averaged over heads: the student pushes its samples' logits up."""
    fake = _logit_list(fake_logits)
    return -torch.stack([f.mean() for f in fake]).mean()


def discriminator_gan_loss(
    real_logits: Tensor | Sequence[Tensor], fake_logits: Tensor | Sequence[Tensor], kind: GanLoss
) -> Tensor:
    """The discriminator's loss, averaged over heads.

    Args:
        real_logits: D(real), one tensor or one per head.
        fake_logits: D(fake), as many as ``real_logits``.
        kind: ``"hinge"`` (``discriminator_hinge_loss``) or ``"non-saturating"``:
            mean(softplus(-D(real))) + mean(softplus(D(fake))), i.e. binary cross-entropy with
            real = 1, fake = 0 (DMD2's classifier loss).
    """
    if kind == "hinge":
        return discriminator_hinge_loss(real_logits, fake_logits)
    real, fake = _logit_list(real_logits), _logit_list(fake_logits)
    if len(real) != len(fake) or not real:
        raise ValueError("need the same, non-zero number of real and fake logit tensors")
    terms = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def generator_gan_loss(fake_logits: Tensor | Sequence[Tensor], kind: GanLoss) -> Tensor:
    """The generator's loss, averaged over heads.

    Args:
        fake_logits: D(fake), one tensor or one per head (keeping the generator's graph).
        kind: ``"hinge"``: -mean(D(fake)) (``generator_hinge_loss``); ``"non-saturating"``:
            mean(softplus(-D(fake))), whose gradient does not vanish while D rejects the fakes.
    """
    if kind == "hinge":
        return generator_hinge_loss(fake_logits)
    return torch.stack([F.softplus(-f).mean() for f in _logit_list(fake_logits)]).mean()


def _block_output_channels(unet: UNet2DConditionModel) -> list[int]:
    channels = list(unet.config["block_out_channels"])
    return [*channels, channels[-1], *reversed(channels)]


class TeacherFeatureDiscriminator(nn.Module):
    """D(x_t, t, c): trainable conv heads over a UNet's down/mid/up block outputs.

    The UNet is kept out of this module's parameters and state dict (only the heads train
    and are saved); by default its weights are frozen here (TSCD: the teacher). Gradients still
    flow *through* it to the input latents, which is what the student's generator loss needs.
    The generator loss also leaves gradients on the heads: step only the student's optimizer
    with it, and zero the heads' gradients before their own step. ``.to(device)`` moves the
    heads only.

    Args:
        teacher: the UNet2DConditionModel whose features the heads read (TSCD: the frozen
            teacher φ; DMD2's GAN term: the fake score, whose LoRA keeps training).
        hidden_channels: width of each head's hidden conv.
        freeze: freeze every weight of ``teacher``; False leaves its trainable ones (a LoRA)
            as they are.
    """

    def __init__(
        self, teacher: UNet2DConditionModel, hidden_channels: int = 64, freeze: bool = True
    ) -> None:
        super().__init__()
        if freeze:
            teacher.requires_grad_(False)
        self._teacher = [teacher]  # a list: not a registered submodule
        if teacher.mid_block is None:
            raise ValueError("the teacher UNet has no mid block")
        self.blocks: list[nn.Module] = [*teacher.down_blocks, teacher.mid_block, *teacher.up_blocks]
        groups = 8 if hidden_channels % 8 == 0 else 1
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, hidden_channels, 3, padding=1),
                nn.GroupNorm(groups, hidden_channels),
                nn.SiLU(),
                nn.Conv2d(hidden_channels, 1, 1),
            )
            for c in _block_output_channels(teacher)
        )

    @property
    def teacher(self) -> UNet2DConditionModel:
        return self._teacher[0]

    def features(
        self, noisy_latents: Tensor, timesteps: Tensor, encoder_hidden_states: Tensor
    ) -> list[Tensor]:
        """The teacher's block outputs on (x_t, t, c), down blocks first, then mid, then up."""
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        # Hooks live only for this call, so the same teacher can serve as ε_φ elsewhere.
        handles = [block.register_forward_hook(hook) for block in self.blocks]
        try:
            self.teacher(noisy_latents, timesteps, encoder_hidden_states)
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != len(self.heads):
            raise RuntimeError(f"captured {len(captured)} features for {len(self.heads)} heads")
        return captured

    def forward(
        self, noisy_latents: Tensor, timesteps: Tensor, encoder_hidden_states: Tensor
    ) -> list[Tensor]:
        """One ``(N, 1, h, w)`` logit map per head."""
        feats = self.features(noisy_latents, timesteps, encoder_hidden_states)
        return [head(f.float()) for head, f in zip(self.heads, feats, strict=True)]


def sample_adversarial_timesteps(
    t_from: Tensor,
    t_b: Tensor,
    k: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t_adv ~ U{max(t_from, 0), ..., t_b + T/k}: a time in the segment, no cleaner than t_from.

    Args:
        t_from: ``(N,)`` the fake sample's own timestep (t_end; -1 = clean).
        t_b: ``(N,)`` the segment's edge timestep (-1 for the lowest segment).
        k: the number of segments.
        num_train_timesteps: T.
        generator: the random source.
    """
    low = t_from.clamp(min=0)
    high = t_b + num_train_timesteps // k  # the segment's top timestep
    gen_device = generator.device if generator is not None else t_from.device
    u = torch.rand(t_from.shape, generator=generator, device=gen_device).to(t_from.device)
    span = high - low + 1
    return low + torch.minimum((u * span).long(), span - 1)


def adversarial_inputs(
    real_latents: Tensor,
    fake: Tensor,
    t_fake: Tensor,
    t_b: Tensor,
    k: int,
    alphas_cumprod: Tensor,
    *,
    generator: torch.Generator | None = None,
    final_alpha_cumprod: float = 1.0,
    t_real: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Real and fake latents, both re-noised to the same t_adv inside the segment.

    The fake (the student's x̂_{t_end}) is carried forward from t_end with q(x_{t_adv} | x_{t_end});
    the real clean latents with q(x_{t_adv} | x0) (or, given ``t_real``, real latents at that
    level with q(x_{t_adv} | x_{t_real})). Both then follow the same marginal at t_adv when the
    student is perfect.

    Args:
        real_latents: the real class: clean data latents x0 ``(N, C, H, W)``, or latents at
            ``t_real`` (e.g. the teacher trajectory's x_{t_end}).
        fake: the student's prediction at ``t_fake`` (keeps its graph).
        t_fake: ``(N,)`` its timesteps (-1 = clean).
        t_b: ``(N,)`` the segment's edge timestep.
        k: the number of segments.
        alphas_cumprod: the ᾱ table.
        generator: the random source.
        final_alpha_cumprod: ᾱ at the clean end.
        t_real: ``(N,)`` the real latents' timesteps, each <= ``t_fake``; None: clean.

    Returns ``(real_noisy, fake_noisy, t_adv)``.
    """
    T = alphas_cumprod.shape[0]
    t_adv = sample_adversarial_timesteps(t_fake, t_b, k, T, generator)
    noises = torch.randn(
        (2, *fake.shape), generator=generator, device=fake.device, dtype=fake.dtype
    )
    if t_real is None:
        real_noisy = add_noise(real_latents, noises[0], t_adv, alphas_cumprod)
    else:
        real_noisy = renoise(
            real_latents, t_real, t_adv, noises[0], alphas_cumprod, final_alpha_cumprod
        )
    fake_noisy = renoise(fake, t_fake, t_adv, noises[1], alphas_cumprod, final_alpha_cumprod)
    return real_noisy, fake_noisy, t_adv


def discriminator_losses(
    discriminator: TeacherFeatureDiscriminator,
    real_noisy: Tensor,
    fake_noisy: Tensor,
    timesteps: Tensor,
    encoder_hidden_states: Tensor,
    kind: GanLoss = "hinge",
) -> dict[str, Tensor]:
    """The discriminator's step: ``kind``'s loss on real vs (detached) fake, both at
    ``timesteps``.

    Args:
        discriminator: the heads over their UNet.
        real_noisy: the real class, noised to ``timesteps``.
        fake_noisy: the generator's samples, noised the same way (detached here).
        timesteps: ``(N,)`` their timesteps.
        encoder_hidden_states: the captions' embeddings.
        kind: the loss (``discriminator_gan_loss``).

    Returns ``loss``, and the mean ``real_logit`` / ``fake_logit`` as diagnostics.
    """
    real_noisy, fake_noisy = real_noisy.detach(), fake_noisy.detach()
    n = real_noisy.shape[0]
    logits = discriminator(
        torch.cat([real_noisy, fake_noisy]),
        torch.cat([timesteps, timesteps]),
        torch.cat([encoder_hidden_states, encoder_hidden_states]),
    )
    real = [logit[:n] for logit in logits]
    fake = [logit[n:] for logit in logits]
    loss = discriminator_gan_loss(real, fake, kind)
    return {
        "loss": loss,
        "real_logit": torch.stack([r.mean() for r in real]).mean().detach(),
        "fake_logit": torch.stack([f.mean() for f in fake]).mean().detach(),
    }


def generator_adversarial_losses(
    discriminator: TeacherFeatureDiscriminator,
    fake_noisy: Tensor,
    timesteps: Tensor,
    encoder_hidden_states: Tensor,
    kind: GanLoss = "hinge",
) -> dict[str, Tensor]:
    """The student's adversarial term; gradients reach the fake's producer.

    Args:
        discriminator: the heads over their UNet.
        fake_noisy: the generator's samples, noised to ``timesteps`` (keeping their graph).
        timesteps: ``(N,)`` their timesteps.
        encoder_hidden_states: the captions' embeddings.
        kind: the loss (``generator_gan_loss``; hinge: -mean(D(fake))).

    Returns ``loss`` and ``fake_logit`` (the mean logit, detached).
    """
    logits = discriminator(fake_noisy, timesteps, encoder_hidden_states)
    loss = generator_gan_loss(logits, kind)
    fake_logit = torch.stack([f.mean() for f in logits]).mean().detach()
    return {"loss": loss, "fake_logit": fake_logit}
