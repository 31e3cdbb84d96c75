"""Feedback learning: the ReFL reward loss, the structure loss and the x0 prediction helpers."""

from __future__ import annotations

import pytest
import torch
from test_objectives_solvers import AC, FixedX0Net, tiny_unet

from hypersd.shapes import fixed_captions
from training.attributes import AttributeNet, AttributeNetConfig
from training.objectives.feedback import (
    RewardTerm,
    denoised_x0_prediction,
    dice_loss,
    feedback_losses,
    noised_x0_prediction,
    refl_loss,
    structure_loss,
)

torch.set_num_threads(1)


def mean_reward(images: torch.Tensor, captions: object) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_refl_zero_above_the_margin_and_positive_below() -> None:
    good = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    above = refl_loss(good, ["a", "b"], mean_reward, alpha=0.3)
    assert float(above["loss"].detach()) == 0.0 and float(above["reward"]) == pytest.approx(0.5)
    above["loss"].backward()
    assert good.grad is not None and float(good.grad.abs().sum()) == 0.0  # no push past α
    bad = torch.tensor([0.1, 0.5]).view(2, 1, 1, 1).expand(2, 3, 4, 4).clone().requires_grad_()
    below = refl_loss(bad, ["a", "b"], mean_reward, alpha=0.3)
    assert float(below["loss"].detach()) == pytest.approx(0.2 / 2)
    below["loss"].backward()
    assert bad.grad is not None
    assert bool((bad.grad[0] < 0).all()) and float(bad.grad[1].abs().sum()) == 0.0


def test_refl_with_the_attribute_network_as_reward() -> None:
    net = AttributeNet(AttributeNetConfig(channels=(8, 8), strides=(2, 2), feature_dim=16)).eval()
    net.requires_grad_(False)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    losses = refl_loss(images, fixed_captions(2), net.log_prob, alpha=0.0)
    assert float(losses["loss"].detach()) > 0  # log-probabilities are below 0
    losses["loss"].backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_feedback_losses_weigh_each_reward_term() -> None:
    images = torch.tensor([0.1, 0.5]).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    terms = [
        RewardTerm("bright", mean_reward, weight=2.0, margin=0.3),  # mean ReLU(0.3 - r) = 0.1
        RewardTerm("dark", lambda x, c: 1 - mean_reward(x, c), weight=0.5, margin=1.0),  # 0.3
    ]
    losses = feedback_losses(images, ["a", "b"], terms)
    assert float(losses["loss"]) == pytest.approx(2.0 * 0.1 + 0.5 * 0.3)
    assert float(losses["bright_loss"]) == pytest.approx(0.1)
    assert float(losses["dark_reward"]) == pytest.approx(0.7)
    assert float(feedback_losses(images, ["a", "b"], [])["loss"]) == 0.0


def test_structure_loss_zero_for_perfect_masks_and_positive_otherwise() -> None:
    masks = (torch.rand(2, 3, 8, 8) > 0.5).float()
    perfect = structure_loss(torch.zeros(2, 3, 8, 8), masks, lambda images: masks)
    assert float(perfect["loss"]) == 0.0 and float(perfect["dice"]) == 0.0
    confident = structure_loss(
        torch.zeros(1), masks, lambda images: 30 * (2 * masks - 1), from_logits=True
    )
    assert float(confident["loss"]) < 1e-6
    wrong = structure_loss(torch.zeros(1), masks, lambda images: 1 - masks)
    assert float(wrong["loss"]) > 1.0
    assert float(dice_loss(1 - masks, masks)) > 0.5


def test_structure_loss_resizes_masks_and_trains_the_image() -> None:
    masks = torch.zeros(1, 2, 16, 16)
    masks[:, 0, :8] = 1
    masks[:, 1, 8:] = 1
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    conv.requires_grad_(False)
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    losses = structure_loss(images, masks, conv, from_logits=True)
    losses["loss"].backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_noised_x0_prediction_in_the_window() -> None:
    latents = torch.randn(64, 4, 2, 2)
    oracle = FixedX0Net(latents, AC)
    x0, t = noised_x0_prediction(
        oracle,
        AC,
        latents,
        torch.zeros(64, 5, 32),
        window=(200, 600),
        generator=torch.Generator().manual_seed(0),
    )
    assert bool((t >= 200).all()) and bool((t <= 600).all())
    torch.testing.assert_close(x0, latents, atol=1e-4, rtol=0)


def test_denoised_x0_prediction_stops_in_the_schedule_with_grad_at_the_last_call() -> None:
    student = tiny_unet(0)
    schedule = [999, 749, 499, 249]
    noise, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    for seed in range(4):
        x0, _, t = denoised_x0_prediction(
            student,
            AC,
            noise,
            cond,
            schedule=schedule,
            stop_range=(1, 2),
            generator=torch.Generator().manual_seed(seed),
        )
        assert t in (749, 499) and x0.requires_grad
    student.zero_grad(set_to_none=True)
    x0.mean().backward()
    assert any(p.grad is not None for p in student.parameters())
    oracle_x0 = torch.randn(2, 4, 8, 8)
    x0, _, _ = denoised_x0_prediction(FixedX0Net(oracle_x0, AC), AC, noise, cond, schedule=schedule)
    torch.testing.assert_close(x0, oracle_x0, atol=1e-3, rtol=0)
