"""The LCM baseline against a line-by-line transcription of diffusers' LCM-LoRA script."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_objectives_solvers import AC, tiny_unet

from training.objectives.lcm import lcm_losses, lcm_solver_timesteps
from training.objectives.solvers import scalings_for_boundary_conditions

torch.set_num_threads(1)


class AffineNet:
    """ε̂ = a · x + b · mean(text) (a mock whose output depends on x and the caption)."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> Any:
        return SimpleNamespace(sample=self.a * x + self.b * ehs.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def _script_reference(
    student: AffineNet,
    target: AffineNet,
    teacher: AffineNet,
    latents: torch.Tensor,
    noise: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    huber_c: float,
) -> torch.Tensor:
    """diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py, transcribed:
    its DDIMSolver tables, boundary scalings, LCM-form guidance and Huber loss."""
    ac = AC
    step_ratio = 20
    ddim_timesteps = (torch.arange(1, 51) * step_ratio).long() - 1
    ddim_alpha_prev = torch.cat([ac[:1], ac[ddim_timesteps[:-1]]])
    start = ddim_timesteps[index]
    timesteps = (start - step_ratio).clamp(min=0)
    c_skip_start, c_out_start = scalings_for_boundary_conditions(start)
    c_skip, c_out = scalings_for_boundary_conditions(timesteps)

    def predicted_origin(eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    a_s = ac[start].view(-1, 1, 1, 1)
    x = a_s.sqrt() * latents + (1 - a_s).sqrt() * noise
    model_pred = c_skip_start * x + c_out_start * predicted_origin(
        student(x, start, cond).sample, x, a_s
    )
    cond_eps = teacher(x, start, cond).sample
    uncond_eps = teacher(x, start, uncond.expand_as(cond)).sample
    cond_x0, uncond_x0 = predicted_origin(cond_eps, x, a_s), predicted_origin(uncond_eps, x, a_s)
    wv = w.view(-1, 1, 1, 1)
    pred_x0 = cond_x0 + wv * (cond_x0 - uncond_x0)
    pred_noise = cond_eps + wv * (cond_eps - uncond_eps)
    a_prev = ddim_alpha_prev[index].view(-1, 1, 1, 1)
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise
    a_t = ac[timesteps].view(-1, 1, 1, 1)
    target_x0 = predicted_origin(target(x_prev, timesteps, cond).sample, x_prev, a_t)
    target_out = c_skip * x_prev + c_out * target_x0
    return torch.mean(torch.sqrt((model_pred - target_out) ** 2 + huber_c**2) - huber_c)


def test_solver_grid() -> None:
    grid = lcm_solver_timesteps(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert bool((grid.diff() == 20).all())


def test_matches_the_diffusers_script_and_uses_the_target_network() -> None:
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    cond, uncond = torch.randn(3, 5, 32), torch.randn(1, 5, 32)
    index = torch.tensor([0, 17, 49])  # the first grid point steps to t = 0
    student, teacher = AffineNet(0.3, 0.5), AffineNet(0.2, 1.0)
    ema_a, ema_b = AffineNet(0.25, 0.4), AffineNet(0.1, -0.4)
    g = torch.Generator().manual_seed(0)
    w = 5.0 + 10.0 * torch.rand(3, generator=torch.Generator().manual_seed(0))
    ours = lcm_losses(
        student,
        ema_a,
        teacher,
        AC,
        latents,
        cond,
        uncond_hidden_states=uncond,
        noise=noise,
        index=index,
        generator=g,
    )
    reference = _script_reference(
        student, ema_a, teacher, latents, noise, index, w, cond, uncond, 0.001
    )
    assert float(ours["loss"]) == pytest.approx(float(reference), rel=1e-4)
    assert float(ours["w"]) == pytest.approx(float(w.mean()), rel=1e-6)
    other = lcm_losses(
        student,
        ema_b,
        teacher,
        AC,
        latents,
        cond,
        uncond_hidden_states=uncond,
        noise=noise,
        index=index,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(other["loss"]) != pytest.approx(float(ours["loss"]), rel=1e-3)


def test_l2_and_huber() -> None:
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    nets = (AffineNet(0.3, 0.5), AffineNet(0.25, 0.4), AffineNet(0.2, 1.0))
    kw: dict[str, Any] = {"noise": torch.randn(2, 4, 8, 8), "index": torch.tensor([10, 40])}
    l2 = lcm_losses(*nets, AC, latents, cond, distance_kind="mse", **kw)
    huber = lcm_losses(*nets, AC, latents, cond, distance_kind="huber", **kw)
    assert float(l2["loss"]) > 0 and float(huber["loss"]) > 0
    assert float(l2["loss"]) != pytest.approx(float(huber["loss"]))


def test_backward_reaches_only_the_student() -> None:
    student, teacher = tiny_unet(0), tiny_unet(1)
    ema = copy.deepcopy(student)
    for m in (student, teacher, ema):
        m.requires_grad_(True)
    losses = lcm_losses(
        student,
        ema,
        teacher,
        AC,
        torch.randn(2, 4, 8, 8),
        torch.randn(2, 5, 32),
        uncond_hidden_states=torch.zeros(1, 5, 32),
        generator=torch.Generator().manual_seed(0),
    )
    losses["loss"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *ema.parameters()])
