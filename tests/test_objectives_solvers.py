"""The shared maths of the distillation objectives: schedule algebra, DDIM, CFG, scalings."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from training.objectives.solvers import (
    CLEAN,
    add_noise,
    alphas_at,
    ddim_step,
    distance,
    guided_epsilon,
    offset_noise,
    pseudo_huber,
    renoise,
    sample_guidance,
    scalings_for_boundary_conditions,
    x0_from_epsilon,
)

torch.set_num_threads(1)


def alphas_cumprod() -> torch.Tensor:
    """SD1.5's 1000-step scaled-linear ᾱ table (the Shapes base model's too)."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return scheduler.alphas_cumprod


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A random epsilon UNet small enough for CPU tests (8x8 latents, 32-dim text)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


class FixedX0Net:
    """A mock epsilon network whose x0 prediction is always ``x0`` (the oracle when x0 is the
    data): ε̂ = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t). ``calls`` records the timesteps seen."""

    def __init__(self, x0: torch.Tensor, table: torch.Tensor) -> None:
        self.x0, self.table = x0, table
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> Any:
        self.calls.append(t.clone())
        alpha = alphas_at(self.table, t).to(x.dtype)
        x0 = self.x0.expand_as(x)
        return SimpleNamespace(sample=(x - alpha.sqrt() * x0) / (1 - alpha).sqrt())


AC = alphas_cumprod()


def _data(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(
        n, 4, 8, 8, generator=g, dtype=torch.float64
    )


def test_alphas_at_clean_end_and_table() -> None:
    t = torch.tensor([CLEAN, 0, 999])
    a = alphas_at(AC, t).flatten()
    assert (
        a[0] == 1.0
        and a[1] == pytest.approx(float(AC[0]))
        and a[2] == pytest.approx(float(AC[999]))
    )
    assert alphas_at(AC, t, final_alpha_cumprod=float(AC[0])).flatten()[0] == pytest.approx(
        float(AC[0])
    )


def test_x0_and_epsilon_round_trip() -> None:
    x0, eps = _data()
    t = torch.tensor([0, 500, 999])
    x_t = add_noise(x0, eps, t, AC)
    torch.testing.assert_close(x0_from_epsilon(x_t, eps, t, AC), x0, rtol=0, atol=1e-5)
    # and back: ε = (x_t - sqrt(ᾱ_t) x0) / sqrt(1 - ᾱ_t)
    alpha = alphas_at(AC, t).to(x_t.dtype)
    torch.testing.assert_close(
        (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt(), eps, rtol=0, atol=1e-5
    )
    # add_noise matches diffusers' DDPMScheduler.add_noise
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(x_t.float(), scheduler.add_noise(x0.float(), eps.float(), t))


def test_ddim_step_with_true_epsilon_recovers_x0_and_the_marginals() -> None:
    x0, eps = _data()
    t = torch.tensor([999, 640, 37])
    x_t = add_noise(x0, eps, t, AC)
    clean = torch.full_like(t, CLEAN)
    torch.testing.assert_close(ddim_step(x_t, eps, t, clean, AC), x0, rtol=0, atol=1e-5)
    s = torch.tensor([500, 200, 19])
    torch.testing.assert_close(ddim_step(x_t, eps, t, s, AC), add_noise(x0, eps, s, AC))
    # a zero-length step is the identity
    torch.testing.assert_close(ddim_step(x_t, eps, t, t, AC), x_t)


def test_ddim_steps_compose_for_the_true_epsilon() -> None:
    x0, eps = _data()
    t, s, r = (
        torch.tensor([999, 700, 300]),
        torch.tensor([600, 450, 120]),
        torch.tensor([-1, 100, 0]),
    )
    x_t = add_noise(x0, eps, t, AC)
    two_steps = ddim_step(ddim_step(x_t, eps, t, s, AC), eps, s, r, AC)
    torch.testing.assert_close(two_steps, ddim_step(x_t, eps, t, r, AC), rtol=0, atol=1e-5)


def test_ddim_step_matches_diffusers_ddim_scheduler() -> None:
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps.tolist():
        expected = scheduler.step(eps, t, x).prev_sample
        ours = ddim_step(
            x,
            eps,
            torch.full((2,), t),
            torch.full((2,), t - 250),
            AC,
            final_alpha_cumprod=float(AC[0]),
        )
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_renoise_follows_the_forward_marginal() -> None:
    x0, eps = _data(n=4000)
    s, t = torch.full((4000,), 300), torch.full((4000,), 800)
    x_s = add_noise(x0, eps, s, AC)
    x_t = renoise(x_s, s, t, torch.randn_like(x_s), AC)
    # Var(x_t) for x0 ~ N(0, 1) stays 1, and the mean coefficient on x0 is sqrt(ᾱ_t)
    assert float(x_t.var()) == pytest.approx(1.0, abs=0.02)
    coefficient = float((x_t * x0).mean() / (x0 * x0).mean())
    assert coefficient == pytest.approx(float(AC[800].sqrt()), abs=0.02)
    with pytest.raises(ValueError):
        renoise(x_t, t, s, eps, AC)


def test_guided_epsilon_per_sample_scale() -> None:
    unet = tiny_unet()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    cond, uncond = torch.randn(3, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        e_c = unet(x, t, cond).sample
        e_u = unet(x, t, uncond.expand(3, -1, -1)).sample
        omega = torch.tensor([1.0, 0.0, 7.5])
        guided = guided_epsilon(unet, x, t, cond, uncond, omega)
        torch.testing.assert_close(guided[0], e_c[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided[1], e_u[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            guided[2], e_u[2] + 7.5 * (e_c[2] - e_u[2]), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(guided_epsilon(unet, x, t, cond), e_c)


def test_sample_guidance_range() -> None:
    omega = sample_guidance(1000, (2.0, 8.0), torch.Generator().manual_seed(0))
    assert omega.shape == (1000,) and float(omega.min()) >= 2.0 and float(omega.max()) <= 8.0
    assert float(omega.mean()) == pytest.approx(5.0, abs=0.3)


def test_boundary_scalings() -> None:
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor([0, 1, 19, 999]))
    assert c_skip.shape == (4, 1, 1, 1)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    # LCM: t * 10 with σ_data = 0.5, so at t = 19 the output is almost all c_out
    assert float(c_skip[2]) == pytest.approx(0.25 / (190**2 + 0.25))
    assert float(c_out[3]) == pytest.approx(9990 / (9990**2 + 0.25) ** 0.5)
    assert bool((c_skip[1:] < 0.01).all()) and bool((c_out[1:] > 0.99).all())


def test_huber_against_mse() -> None:
    a = torch.zeros(1000)
    small, large = torch.full((1000,), 1e-5), torch.full((1000,), 10.0)
    c = 0.001
    # near zero, pseudo-Huber ≈ d² / 2c (quadratic); far away ≈ |d| - c (linear)
    assert float(pseudo_huber(small, a, c)) == pytest.approx(1e-10 / (2 * c), rel=1e-2)
    assert float(pseudo_huber(large, a, c)) == pytest.approx(10.0 - c, rel=1e-6)
    assert float(distance(large, a, "mse")) == pytest.approx(100.0)
    assert float(distance(large, a, "huber", c)) == pytest.approx(10.0 - c, rel=1e-6)
    assert float(distance(a, a, "huber")) == 0.0
    with pytest.raises(ValueError):
        distance(a, a, "l1")  # type: ignore[arg-type]


def test_offset_noise() -> None:
    like = torch.zeros(512, 4, 8, 8)
    plain = offset_noise(like, 0.0, torch.Generator().manual_seed(0))
    offset = offset_noise(like, 0.5, torch.Generator().manual_seed(0))
    # the offset adds a per-(sample, channel) constant with std 0.5
    spatial_mean_std = float(offset.mean(dim=(2, 3)).std())
    assert spatial_mean_std == pytest.approx((0.25 + 1 / 64) ** 0.5, rel=0.1)
    assert float(plain.mean(dim=(2, 3)).std()) == pytest.approx(1 / 8, rel=0.1)
