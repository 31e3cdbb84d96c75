"""The LCM baseline: k = 1 consistency distillation as diffusers' LCM(-LoRA) scripts do it.

A DDIM solver over a 50-step teacher grid (skip 20 at T = 1000), LCM's boundary scalings
c_skip, c_out at 10·t (σ_data = 0.5), the teacher guided in LCM's form ε_c + w (ε_c - ε_u)
with w ~ U[w_min, w_max], and a pseudo-Huber (c = 0.001) or L2 distance to the target network's
consistency output one solver step below. The LoRA scripts pass the online student as the target
(run without grad); the full-model ones an EMA of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.objectives.solvers import (
    Distance,
    EpsilonModel,
    add_noise,
    alphas_at,
    distance,
    guided_epsilon,
    sample_guidance,
    scalings_for_boundary_conditions,
    x0_from_epsilon,
)


def lcm_solver_timesteps(
    num_train_timesteps: int = 1000,
    num_ddim_timesteps: int = 50,
    device: torch.device | str = "cpu",
) -> Tensor:
    """LCM's DDIMSolver grid on ``device``: (1..N) · T/N - 1 (19, 39, ..., 999 for N = 50)."""
    step_ratio = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, device=device) * step_ratio - 1


def consistency_output(
    x_t: Tensor,
    epsilon: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂0(x_t, ε̂): LCM's parametrisation (f(x, 0) = x)."""
    c_skip, c_out = scalings_for_boundary_conditions(timesteps, timestep_scaling=timestep_scaling)
    x0 = x0_from_epsilon(x_t, epsilon, timesteps, alphas_cumprod)
    return c_skip.to(x_t.dtype) * x_t + c_out.to(x_t.dtype) * x0


def lcm_losses(
    student: EpsilonModel,
    target: EpsilonModel,
    teacher: EpsilonModel,
    alphas_cumprod: Tensor,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    *,
    uncond_hidden_states: Tensor | None = None,
    w_range: tuple[float, float] | None = (5.0, 15.0),
    num_ddim_timesteps: int = 50,
    distance_kind: Distance = "huber",
    huber_c: float = 0.001,
    timestep_scaling: float = 10.0,
    noise: Tensor | None = None,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """LCM's consistency distillation loss (diffusers ``train_lcm_distill_lora_sd_wds.py``).

    t_{n+k} = grid[index] (index ~ U{0..N-1}), t_n = max(t_{n+k} - T/N, 0);
    x_{t_{n+k}} = add_noise(x0, ε, t_{n+k}); prediction = f_θ(x_{t_{n+k}}, t_{n+k});
    the teacher's guided DDIM step to x̂_{t_n} (ᾱ at t_n; the first grid point steps to t = 0);
    target = f_θ⁻(x̂_{t_n}, t_n); loss = d(prediction, target).

    Args:
        student: θ, the online network (e.g. with a trainable LoRA).
        target: θ⁻: an EMA of the student, or the student itself (LCM-LoRA); run without grad.
        teacher: the frozen base model.
        alphas_cumprod: the ᾱ table.
        latents: clean latents x0 ``(N, C, H, W)``.
        encoder_hidden_states: the captions' embeddings ``(N, L, D)``.
        uncond_hidden_states: the empty caption's embeddings (for guidance).
        w_range: (w_min, w_max) in LCM's form (guidance scale ω = 1 + w); None for no guidance.
        num_ddim_timesteps: N, the solver's grid size (skip T/N).
        distance_kind: ``"huber"`` (pseudo-Huber, c = ``huber_c``) or ``"mse"``.
        huber_c: the pseudo-Huber constant (0.001 in the LCM scripts).
        timestep_scaling: the boundary scalings' time scale (10).
        noise: ε (drawn when None).
        index: fixed ``(N,)`` grid indices (drawn when None).
        generator: the random source.

    Returns ``loss``, ``distance`` and diagnostics ``t`` (mean start timestep), ``w`` (mean w).
    """
    n, device = latents.shape[0], latents.device
    T = alphas_cumprod.shape[0]
    grid = lcm_solver_timesteps(T, num_ddim_timesteps, device)
    topk = T // num_ddim_timesteps
    if index is None:
        gen_device = generator.device if generator is not None else device
        index = torch.randint(0, num_ddim_timesteps, (n,), generator=generator, device=gen_device)
    index = index.to(device)
    start = grid[index]
    prev = (start - topk).clamp(min=0)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    x_start = add_noise(latents, noise, start, alphas_cumprod)

    prediction = consistency_output(
        x_start,
        student(x_start, start, encoder_hidden_states).sample,
        start,
        alphas_cumprod,
        timestep_scaling,
    )

    w = None
    with torch.no_grad():
        if w_range is not None and uncond_hidden_states is not None:
            w = sample_guidance(n, w_range, generator, device)
        teacher_eps = guided_epsilon(
            teacher,
            x_start,
            start,
            encoder_hidden_states,
            uncond_hidden_states,
            None if w is None else 1.0 + w,
        )
        teacher_x0 = x0_from_epsilon(x_start, teacher_eps, start, alphas_cumprod)
        alpha_prev = alphas_at(alphas_cumprod, prev).to(x_start.dtype)
        x_prev = alpha_prev.sqrt() * teacher_x0 + (1 - alpha_prev).sqrt() * teacher_eps
        target_out = consistency_output(
            x_prev,
            target(x_prev, prev, encoder_hidden_states).sample,
            prev,
            alphas_cumprod,
            timestep_scaling,
        )
    d = distance(prediction, target_out, distance_kind, huber_c)
    return {
        "loss": d,
        "distance": d.detach(),
        "t": start.float().mean(),
        "w": w.mean() if w is not None else torch.zeros(()),
    }
