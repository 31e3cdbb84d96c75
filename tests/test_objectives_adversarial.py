"""The adversarial term: hinge losses, the teacher-feature discriminator, re-noising in-segment."""

from __future__ import annotations

import pytest
import torch
from test_objectives_solvers import AC, tiny_unet

from training.objectives.adversarial import (
    ADVERSARIAL_WEIGHTS,
    TeacherFeatureDiscriminator,
    adversarial_inputs,
    adversarial_weight,
    discriminator_gan_loss,
    discriminator_hinge_loss,
    discriminator_losses,
    generator_adversarial_losses,
    generator_gan_loss,
    generator_hinge_loss,
    sample_adversarial_timesteps,
)

torch.set_num_threads(1)


def test_discriminator_hinge_values_and_signs() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3 ; relu(1 + fake) = [0, 1, 2] -> 1
    assert float(discriminator_hinge_loss(real, fake)) == pytest.approx(2.5 / 3 + 1.0)
    # a confident, correct discriminator pays nothing; a fooled one pays 2 per side
    assert float(discriminator_hinge_loss(torch.ones(4), -torch.ones(4))) == 0.0
    assert float(discriminator_hinge_loss(-torch.ones(4), torch.ones(4))) == 4.0
    # several heads: the mean over heads
    two = discriminator_hinge_loss([real, torch.ones(2)], [fake, -torch.ones(2)])
    assert float(two) == pytest.approx((2.5 / 3 + 1.0) / 2)


def test_generator_hinge_sign() -> None:
    assert float(generator_hinge_loss(torch.tensor([1.0, 3.0]))) == -2.0
    fake = torch.zeros(3, requires_grad=True)
    generator_hinge_loss([fake]).backward()
    assert fake.grad is not None and bool((fake.grad < 0).all())  # descent raises D(fake)


def test_weights_grow_as_segments_fall() -> None:
    assert set(ADVERSARIAL_WEIGHTS) == {8, 4, 2, 1}
    weights = [adversarial_weight(k) for k in (8, 4, 2, 1)]
    assert weights == sorted(weights) and weights[-1] > weights[0] > 0
    assert max(weights[:2]) < min(weights[2:])
    assert adversarial_weight(3) == 0.0


def test_discriminator_heads_over_teacher_blocks() -> None:
    teacher = tiny_unet(1)
    discriminator = TeacherFeatureDiscriminator(teacher, hidden_channels=16)
    assert len(discriminator.heads) == 2 + 1 + 2  # down, mid, up blocks
    # only the heads are the discriminator's parameters; the teacher is frozen
    n_heads = sum(p.numel() for p in discriminator.heads.parameters())
    assert sum(p.numel() for p in discriminator.parameters()) == n_heads
    assert all(not k.startswith("_teacher") for k in discriminator.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.randn(2, 5, 32)
    logits = discriminator(x, t, c)
    assert [tuple(logit.shape) for logit in logits] == [
        (2, 1, 4, 4),
        (2, 1, 4, 4),
        (2, 1, 4, 4),
        (2, 1, 8, 8),
        (2, 1, 8, 8),
    ]
    # the hooks are gone: the teacher still works alone and captures nothing more
    assert all(not block._forward_hooks for block in discriminator.blocks)


def test_discriminator_step_trains_heads_only_and_generator_step_reaches_the_fake() -> None:
    teacher = tiny_unet(1)
    discriminator = TeacherFeatureDiscriminator(teacher, hidden_channels=16)
    producer = torch.nn.Parameter(torch.randn(2, 4, 8, 8))  # stands in for the student
    real, t, c = torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), torch.randn(2, 5, 32)
    d = discriminator_losses(discriminator, real, producer * 1.0, t, c)
    d["loss"].backward()
    assert producer.grad is None
    assert all(p.grad is not None for p in discriminator.heads.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    g = generator_adversarial_losses(discriminator, producer * 1.0, t, c)
    g["loss"].backward()
    assert producer.grad is not None and bool(producer.grad.abs().sum() > 0)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_adversarial_times_stay_in_the_segment(k: int) -> None:
    width = 1000 // k
    t_b = torch.randint(0, k, (500,)) * width - 1
    t_end = t_b + torch.randint(0, width, (500,))
    t_adv = sample_adversarial_timesteps(t_end, t_b, k, 1000, torch.Generator().manual_seed(0))
    assert bool((t_adv >= t_end.clamp(min=0)).all()) and bool((t_adv <= t_b + width).all())
    real, fake, t_adv2 = adversarial_inputs(
        torch.randn(500, 4, 2, 2),
        torch.randn(500, 4, 2, 2),
        t_end,
        t_b,
        k,
        AC,
        generator=torch.Generator().manual_seed(1),
    )
    assert real.shape == fake.shape == (500, 4, 2, 2)
    assert bool((t_adv2 >= t_end.clamp(min=0)).all()) and bool((t_adv2 <= t_b + width).all())


def test_non_saturating_losses_values_and_hinge_delegation() -> None:
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    sp = torch.nn.functional.softplus
    # BCE with real = 1, fake = 0: mean softplus(-D(real)) + mean softplus(D(fake))
    expected = (sp(torch.tensor(0.0)) + sp(torch.tensor(-2.0))) / 2
    expected = expected + (sp(torch.tensor(0.0)) + sp(torch.tensor(-1.0))) / 2
    got = discriminator_gan_loss(real, fake, "non-saturating")
    assert float(got) == pytest.approx(float(expected))
    assert float(generator_gan_loss(fake, "non-saturating")) == pytest.approx(
        float((sp(torch.tensor(0.0)) + sp(torch.tensor(1.0))) / 2)
    )
    # "hinge" is exactly the TSCD pair
    assert float(discriminator_gan_loss(real, fake, "hinge")) == float(
        discriminator_hinge_loss(real, fake)
    )
    assert float(generator_gan_loss([fake], "hinge")) == float(generator_hinge_loss([fake]))
    # the non-saturating generator's gradient stays large where D rejects the fakes
    rejected = torch.full((3,), -8.0, requires_grad=True)
    generator_gan_loss(rejected, "non-saturating").backward()
    assert rejected.grad is not None
    torch.testing.assert_close(rejected.grad, torch.full((3,), -1 / 3), atol=1e-3, rtol=0)


def test_heads_over_a_training_unet_leave_its_lora_trainable() -> None:
    """``freeze=False`` (DMD2's heads over the fake score): the loss reaches its trainable
    weights too; the default freezes the UNet (TSCD's teacher)."""
    unet = tiny_unet(0)
    unet.requires_grad_(False)
    unet.conv_out.weight.requires_grad_(False)
    trainable = unet.conv_in.weight.requires_grad_(True)  # stands in for a LoRA weight
    discriminator = TeacherFeatureDiscriminator(unet, hidden_channels=8, freeze=False)
    assert trainable.requires_grad
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    losses = discriminator_losses(discriminator, x, x + 1, t, cond, kind="non-saturating")
    losses["loss"].backward()
    assert trainable.grad is not None and bool(trainable.grad.abs().sum() > 0)
    TeacherFeatureDiscriminator(unet, hidden_channels=8)
    assert not trainable.requires_grad
