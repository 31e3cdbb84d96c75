"""DMD2's distribution matching: the gradient's direction and scale, the fake score's loss."""

from __future__ import annotations

import copy

import pytest
import torch
from test_objectives_solvers import AC, FixedX0Net, tiny_unet

from training.objectives.dmd import dmd_losses, fake_score_losses

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
