"""DMD2's distribution matching: the gradient's direction and scale, the fake score's loss, and
the GAN term over the fake score's features."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_objectives_solvers import AC, FixedX0Net, tiny_unet

from training.objectives.adversarial import TeacherFeatureDiscriminator
from training.objectives.dmd import (
    dmd_losses,
    fake_score_losses,
    gan_discriminator_losses,
    gan_generator_losses,
)

torch.set_num_threads(1)


def test_gradient_moves_x_towards_the_real_x0_and_away_from_the_fake() -> None:
    x = torch.nn.Parameter(torch.zeros(2, 4, 8, 8))
    real_x0, fake_x0 = torch.ones(1, 4, 8, 8), -torch.ones(1, 4, 8, 8)
    losses = dmd_losses(
        x * 1.0,
        FixedX0Net(real_x0, AC),
        FixedX0Net(fake_x0, AC),
        AC,
        torch.zeros(2, 5, 32),
        generator=torch.Generator().manual_seed(0),
    )
    losses["loss"].backward()
    assert x.grad is not None
    # grad = (x0_fake - x0_real) / mean|x - x0_real| = (-1 - 1) / 1 = -2 everywhere; the loss's
    # gradient is grad / numel (0.5 · mse)
    torch.testing.assert_close(x.grad, torch.full_like(x, -2.0 / x.numel()), rtol=1e-4, atol=0)
    assert float(losses["grad_norm"]) == pytest.approx(2.0, rel=1e-4)
    with torch.no_grad():
        stepped = x - 100.0 * x.grad
    assert float((stepped - real_x0).norm()) < float((x.detach() - real_x0).norm())
    assert float((stepped - fake_x0).norm()) > float((x.detach() - fake_x0).norm())


def test_gradient_is_normalised_per_sample() -> None:
    x = torch.nn.Parameter(torch.stack([torch.zeros(4, 8, 8), torch.full((4, 8, 8), -3.0)]))
    real_x0 = torch.ones(1, 4, 8, 8)
    fake_x0 = torch.full((1, 4, 8, 8), 2.0)
    losses = dmd_losses(
        x * 1.0, FixedX0Net(real_x0, AC), FixedX0Net(fake_x0, AC), AC, torch.zeros(2, 5, 32)
    )
    losses["loss"].backward()
    assert x.grad is not None
    # (2 - 1) / |0 - 1| = 1 for the first sample, (2 - 1) / |-3 - 1| = 0.25 for the second
    per_sample = x.grad.mean(dim=(1, 2, 3)) * x.numel()
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 0.25]), rtol=1e-4, atol=0)


def test_timesteps_in_dmd2_range_and_guidance_used() -> None:
    teacher, fake = tiny_unet(1), tiny_unet(2)
    x = torch.randn(64, 4, 8, 8)
    cond, uncond = torch.randn(64, 5, 32), torch.randn(1, 5, 32)
    seen: list[torch.Tensor] = []
    fake.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    with torch.no_grad():
        out = dmd_losses(x, teacher, fake, AC, cond, generator=torch.Generator().manual_seed(0))
        guided = dmd_losses(
            x,
            teacher,
            fake,
            AC,
            cond,
            uncond_hidden_states=uncond,
            guidance=4.0,
            generator=torch.Generator().manual_seed(0),
        )
    assert float(seen[0].min()) >= 20 and float(seen[0].max()) <= 980
    assert float(out["loss"]) != float(guided["loss"])


def test_backward_reaches_the_generator_only_and_fake_score_trains_alone() -> None:
    generator_net, teacher = tiny_unet(0), tiny_unet(1)
    fake = copy.deepcopy(teacher)
    for m in (generator_net, teacher, fake):
        m.requires_grad_(True)
    noise, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    # a one-step student: x = x0 prediction from pure noise at t = 999
    t = torch.full((2,), 999)
    eps = generator_net(noise, t, cond).sample
    alpha = AC[999]
    x = (noise - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    dmd = dmd_losses(
        x,
        teacher,
        fake,
        AC,
        cond,
        uncond_hidden_states=torch.zeros(1, 5, 32),
        guidance=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    dmd["loss"].backward()
    assert any(p.grad is not None for p in generator_net.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *fake.parameters()])
    generator_net.zero_grad(set_to_none=True)
    own = fake_score_losses(fake, x, AC, cond, generator=torch.Generator().manual_seed(1))
    own["loss"].backward()
    assert any(p.grad is not None for p in fake.parameters())
    assert all(p.grad is None for p in [*generator_net.parameters(), *teacher.parameters()])


def test_fake_score_loss_is_zero_for_the_true_noise() -> None:
    x, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 400, 990])
    oracle = FixedX0Net(x, AC)  # predicts exactly the ε that noised x
    losses = fake_score_losses(oracle, x, AC, torch.zeros(3, 5, 32), noise=noise, timesteps=t)
    assert float(losses["loss"]) < 1e-8


def test_gan_terms_train_the_student_and_the_heads_on_their_own_sides() -> None:
    """DMD2's GAN term: the generator loss reaches the student's output (through the fake score's
    features); the discriminator loss reaches the heads and the fake score's trainable weights,
    never the student's output; real and fake are scored at one t per sample."""
    fake_score = tiny_unet(2)
    fake_score.requires_grad_(False)
    lora_like = fake_score.conv_in.weight.requires_grad_(True)
    discriminator = TeacherFeatureDiscriminator(fake_score, hidden_channels=8, freeze=False)
    x = torch.nn.Parameter(torch.randn(2, 4, 8, 8))
    real, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    g = torch.Generator().manual_seed(0)

    generator_side = gan_generator_losses(discriminator, x * 1.0, AC, cond, generator=g)
    assert set(generator_side) == {"loss", "fake_logit"}
    generator_side["loss"].backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)

    x.grad, lora_like.grad = None, None
    for head in discriminator.heads.parameters():
        head.grad = None
    seen: list[torch.Tensor] = []
    fake_score.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    t = torch.tensor([100, 700])
    disc = gan_discriminator_losses(discriminator, x * 1.0, real, AC, cond, timesteps=t)
    disc["loss"].backward()
    assert set(disc) == {"loss", "real_logit", "fake_logit"}
    assert x.grad is None
    assert all(p.grad is not None for p in discriminator.heads.parameters())
    assert lora_like.grad is not None
    assert torch.equal(seen[0], torch.cat([t, t]))  # real, then fake, at the same t


def test_gan_loss_kinds_and_timestep_range() -> None:
    discriminator = TeacherFeatureDiscriminator(tiny_unet(1), hidden_channels=8)
    x, real, cond = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8), torch.randn(64, 5, 32)
    seen: list[torch.Tensor] = []
    discriminator.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    noise, t = torch.randn(2, 64, 4, 8, 8), torch.full((64,), 500)
    with torch.no_grad():
        hinge = gan_discriminator_losses(
            discriminator, x, real, AC, cond, kind="hinge", noise=noise, timesteps=t
        )
        soft = gan_discriminator_losses(discriminator, x, real, AC, cond, noise=noise, timesteps=t)
        gan_generator_losses(discriminator, x, AC, cond, generator=torch.Generator().manual_seed(0))
    # fresh heads give logits near 0: hinge ~ 2, BCE ~ 2 log 2
    assert float(hinge["loss"]) == pytest.approx(2.0, abs=0.3)
    assert float(soft["loss"]) == pytest.approx(2 * math.log(2), abs=0.3)
    assert float(hinge["real_logit"]) == float(soft["real_logit"])
    drawn = seen[-1]
    assert int(drawn.min()) >= 0 and int(drawn.max()) <= 999 and drawn.unique().numel() > 10
