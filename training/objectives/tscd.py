"""Trajectory-segmented consistency distillation (TSCD, Hyper-SD §3.1).

Stage k splits the trajectory into k segments. A student sample at t_n is asked to land where
the teacher's trajectory is at t_end, a point between t_n's segment edge t_b and t_{n-1}; the
target is the EMA network's own jump from t_{n-1} (one teacher DDIM step below t_n) to t_end.
At k = 1 this is consistency distillation to x0; at t_end = t_{n-1} the target is the teacher's
x_{t_{n-1}} itself.

Timesteps (see ``solvers``): diffusers' integers, with -1 the clean end. The DDIM grid with skip s
is {s-1, 2s-1, ..., T-1} (LCM's solver grid: 19, 39, ..., 999 for s = 20) and the segment edges
are the timesteps a DDIM "trailing" sampler visits at k steps: jT/k - 1 (749, 499, 249, -1 at
k = 4). So the distilled k-step model's jumps are exactly the ones the service runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from training.objectives.adversarial import (
    TeacherFeatureDiscriminator,
    adversarial_inputs,
    discriminator_losses,
    generator_adversarial_losses,
)
from training.objectives.solvers import (
    Distance,
    EpsilonModel,
    add_noise,
    ddim_step,
    distance,
    guided_epsilon,
    offset_noise,
    sample_guidance,
)

AdversarialReal = Literal["data", "teacher"]
"""The adversarial term's real class: data latents, or the teacher trajectory's x_{t_end}."""


@overload
def segment_lower_edge(t: int, k: int, num_train_timesteps: int) -> int: ...
@overload
def segment_lower_edge(t: Tensor, k: int, num_train_timesteps: int) -> Tensor: ...
def segment_lower_edge(t: Tensor | int, k: int, num_train_timesteps: int) -> Tensor | int:
    """⌊t / (T/k)⌋ · (T/k): the lower edge of t's segment on the axis [0, T) cut in k pieces.

    For diffusers timesteps the edge's own timestep is one less (``segment_start_timestep``).

    Args:
        t: an integer time, or an ``(N,)`` tensor of them, in ``[0, T)``.
        k: the number of segments (must divide T).
        num_train_timesteps: T.
    """
    if num_train_timesteps % k:
        raise ValueError(f"k = {k} must divide T = {num_train_timesteps}")
    width = num_train_timesteps // k
    if isinstance(t, int):
        return (t // width) * width
    return torch.div(t, width, rounding_mode="floor") * width


def segment_start_timestep(t: Tensor, k: int, num_train_timesteps: int) -> Tensor:
    """t_b: the timestep a k-step trailing DDIM sampler jumps to from t's segment (-1 = clean).

    Segment j holds timesteps [jT/k, (j+1)T/k - 1]; its top is a k-step sampler's timestep and
    its target edge is jT/k - 1, the next segment's top (or -1, the clean end, for j = 0).
    """
    return segment_lower_edge(t, k, num_train_timesteps) - 1


@dataclass(frozen=True)
class TSCDTimesteps:
    """The timesteps of one TSCD batch, each ``(N,)`` long.

    Args:
        t_n: where the student starts (on the grid).
        t_prev: t_{n-1} = t_n - s, where one teacher DDIM step lands.
        t_end: the common destination, on the grid in [t_b, t_{n-1}].
        t_b: the segment's edge timestep (-1 = clean).
    """

    t_n: Tensor
    t_prev: Tensor
    t_end: Tensor
    t_b: Tensor


def sample_tscd_timesteps(
    batch: int,
    k: int,
    skip: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    edge_probability: float = 0.0,
) -> TSCDTimesteps:
    """Draw t_n uniformly on the grid {s-1, 2s-1, ..., T-1}, then t_{n-1} = t_n - s and
    t_end ~ U{t_b, t_b + s, ..., t_{n-1}} (uniform on the grid points of [t_b, t_{n-1}]);
    with ``edge_probability`` p, t_end = t_b instead.

    Uniform t_end rarely trains the jump the k-step sampler makes (t_n to the segment's edge):
    at k = 1 with s = 25, ~11% of samples target x0. p makes that jump a share >= p.

    Args:
        batch: N.
        k: the stage's number of segments (k must divide T, and s must divide T/k so that
            segment edges lie on the grid).
        skip: s, the teacher's DDIM skip interval (T/s teacher steps over the trajectory).
        num_train_timesteps: T.
        generator: the random source.
        device: where the returned tensors live.
        edge_probability: p in [0, 1], the chance that t_end is the segment's edge t_b; 0
            draws nothing more from ``generator`` (the uniform t_end alone).
    """
    if not 0.0 <= edge_probability <= 1.0:
        raise ValueError(f"edge_probability must be in [0, 1], got {edge_probability}")
    if num_train_timesteps % k or (num_train_timesteps // k) % skip:
        raise ValueError(
            f"skip s = {skip} must divide T/k = {num_train_timesteps}/{k} "
            "so that the segment edges lie on the DDIM grid"
        )
    gen_device = generator.device if generator is not None else device
    points = num_train_timesteps // skip
    index = torch.randint(1, points + 1, (batch,), generator=generator, device=gen_device)
    t_n = index * skip - 1
    t_prev = t_n - skip
    t_b = segment_start_timestep(t_n, k, num_train_timesteps)
    choices = torch.div(t_prev - t_b, skip, rounding_mode="floor") + 1  # grid points in range
    u = torch.rand(batch, generator=generator, device=gen_device)
    j = torch.minimum((u * choices).long(), choices - 1)
    if edge_probability > 0:
        at_edge = torch.rand(batch, generator=generator, device=gen_device) < edge_probability
        j = torch.where(at_edge, torch.zeros_like(j), j)
    t_end = t_b + j * skip
    return TSCDTimesteps(
        t_n=t_n.to(device), t_prev=t_prev.to(device), t_end=t_end.to(device), t_b=t_b.to(device)
    )


@dataclass(frozen=True)
class TSCDPrediction:
    """What one TSCD batch computes, for the loss and the adversarial term.

    Args:
        student_end: the student's x̂_{t_end}, carried by DDIM from t_n with its own ε (has grad).
        target_end: the EMA target's x̂_{t_end}, carried from the teacher's x_{t_{n-1}} (no grad).
        x_prev: the teacher's one DDIM step x_{t_{n-1}} (no grad).
        timesteps: the batch's timesteps.
        guidance: the teacher's per-sample ω, or None without guidance.
    """

    student_end: Tensor
    target_end: Tensor
    x_prev: Tensor
    timesteps: TSCDTimesteps
    guidance: Tensor | None


def tscd_predict(
    student: EpsilonModel,
    target: EpsilonModel,
    teacher: EpsilonModel,
    alphas_cumprod: Tensor,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    *,
    k: int,
    skip: int,
    uncond_hidden_states: Tensor | None = None,
    guidance_range: tuple[float, float] | None = None,
    noise: Tensor | None = None,
    noise_offset: float = 0.0,
    timesteps: TSCDTimesteps | None = None,
    edge_probability: float = 0.0,
    final_alpha_cumprod: float = 1.0,
    generator: torch.Generator | None = None,
) -> TSCDPrediction:
    """The student's and the target's predictions at t_end (Hyper-SD eq. for TSCD).

    x_{t_n} = sqrt(ᾱ_{t_n}) x0 + sqrt(1 - ᾱ_{t_n}) ε; the teacher takes one DDIM step
    (guided with ω ~ U[ω_min, ω_max] when ``guidance_range`` and ``uncond_hidden_states`` are
    given) to x_{t_{n-1}}; student_end = DDIM(x_{t_n}, ε_θ(x_{t_n}, t_n), t_n → t_end);
    target_end = DDIM(x_{t_{n-1}}, ε_θ⁻(x_{t_{n-1}}, t_{n-1}), t_{n-1} → t_end), which is
    x_{t_{n-1}} itself when t_end = t_{n-1}.

    Args:
        student: the online network θ being trained (e.g. the UNet with a trainable LoRA).
        target: θ⁻, the EMA of the student (or the student itself), run without grad.
        teacher: the frozen base model φ, run without grad.
        alphas_cumprod: the ᾱ table of the teacher's (1000-step) schedule.
        latents: clean latents x0 ``(N, C, H, W)`` (already scaled by the VAE factor).
        encoder_hidden_states: the captions' text embeddings ``(N, L, D)``.
        k: the stage's number of segments (8, 4, 2, 1).
        skip: the teacher's DDIM skip interval s.
        uncond_hidden_states: the empty caption's embeddings for the teacher's CFG.
        guidance_range: (ω_min, ω_max) for the teacher's CFG; None for no guidance.
        noise: ε; drawn (with ``noise_offset``) when None.
        noise_offset: offset-noise strength for the drawn ε.
        timesteps: fixed timesteps (for tests); drawn with ``sample_tscd_timesteps`` when None.
        edge_probability: drawn timesteps' chance of t_end = the segment's edge t_b.
        final_alpha_cumprod: ᾱ at the clean end (-1).
        generator: the random source.
    """
    n, device = latents.shape[0], latents.device
    T = alphas_cumprod.shape[0]
    ts = timesteps
    if ts is None:
        ts = sample_tscd_timesteps(n, k, skip, T, generator, device, edge_probability)
    if noise is None:
        noise = offset_noise(latents, noise_offset, generator)
    x_n = add_noise(latents, noise, ts.t_n, alphas_cumprod)

    student_eps = student(x_n, ts.t_n, encoder_hidden_states).sample
    student_end = ddim_step(x_n, student_eps, ts.t_n, ts.t_end, alphas_cumprod, final_alpha_cumprod)

    guidance = None
    with torch.no_grad():
        if guidance_range is not None and uncond_hidden_states is not None:
            guidance = sample_guidance(n, guidance_range, generator, device)
        teacher_eps = guided_epsilon(
            teacher, x_n, ts.t_n, encoder_hidden_states, uncond_hidden_states, guidance
        )
        x_prev = ddim_step(x_n, teacher_eps, ts.t_n, ts.t_prev, alphas_cumprod, final_alpha_cumprod)
        # At t_{n-1} = -1 the target network is never asked about a clean input: t_end is -1 too.
        t_prev_safe = ts.t_prev.clamp(min=0)
        target_eps = target(x_prev, t_prev_safe, encoder_hidden_states).sample
        target_end = ddim_step(
            x_prev, target_eps, t_prev_safe, ts.t_end, alphas_cumprod, final_alpha_cumprod
        )
        at_boundary = (ts.t_end == ts.t_prev).view(-1, 1, 1, 1)
        target_end = torch.where(at_boundary, x_prev, target_end)
    return TSCDPrediction(student_end, target_end.detach(), x_prev.detach(), ts, guidance)


def tscd_losses(
    prediction: TSCDPrediction,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    alphas_cumprod: Tensor,
    *,
    k: int,
    distance_kind: Distance = "mse",
    huber_c: float = 0.001,
    final_alpha_cumprod: float = 1.0,
    discriminator: TeacherFeatureDiscriminator | None = None,
    adversarial_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The TSCD loss of one batch's ``tscd_predict``: d(student_end, target_end)
    (+ λ_adv · the generator's hinge loss).

    Args:
        prediction: ``tscd_predict`` of the batch (the student's part keeps its graph); the
            training loop hands the same prediction, detached, to the discriminator's step.
        latents: the batch's clean latents (the adversarial term's real samples).
        encoder_hidden_states: the captions' embeddings.
        alphas_cumprod: the ᾱ table.
        k: the stage's number of segments.
        distance_kind: ``"mse"`` or ``"huber"`` (pseudo-Huber with c = ``huber_c``, LCM's 0.001).
        huber_c: the pseudo-Huber constant.
        final_alpha_cumprod: ᾱ at the clean end.
        discriminator: when given with ``adversarial_weight > 0``, the adversarial term: the
            student's x̂_{t_end} and the real latents, both re-noised to a time in the segment,
            scored by the discriminator over the frozen teacher's features.
        adversarial_weight: λ_adv (see ``adversarial.adversarial_weight(k)``).
        generator: the random source of the adversarial re-noising.

    Returns scalars: ``loss`` (to minimise), ``distance``, ``adversarial`` (0 without a
    discriminator), and diagnostics ``t_n``, ``t_end`` (batch means), ``boundary_fraction``
    (share of t_end = t_{n-1}), ``guidance`` (mean ω, 0 without guidance).
    """
    d = distance(prediction.student_end, prediction.target_end, distance_kind, huber_c)
    loss = d
    adversarial = torch.zeros((), device=latents.device)
    if discriminator is not None and adversarial_weight > 0:
        ts = prediction.timesteps
        _, fake, t_adv = adversarial_inputs(
            latents,
            prediction.student_end,
            ts.t_end,
            ts.t_b,
            k,
            alphas_cumprod,
            generator=generator,
            final_alpha_cumprod=final_alpha_cumprod,
        )
        adversarial = generator_adversarial_losses(
            discriminator, fake, t_adv, encoder_hidden_states
        )["loss"]
        loss = loss + adversarial_weight * adversarial
    ts = prediction.timesteps
    g = prediction.guidance
    return {
        "loss": loss,
        "distance": d.detach(),
        "adversarial": adversarial.detach(),
        "t_n": ts.t_n.float().mean(),
        "t_end": ts.t_end.float().mean(),
        "boundary_fraction": (ts.t_end == ts.t_prev).float().mean(),
        "guidance": g.mean() if g is not None else torch.zeros((), device=latents.device),
    }


def tscd_discriminator_losses(
    discriminator: TeacherFeatureDiscriminator,
    prediction: TSCDPrediction,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    alphas_cumprod: Tensor,
    *,
    k: int,
    final_alpha_cumprod: float = 1.0,
    real: AdversarialReal = "data",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The discriminator's step of TSCD's adversarial term (on the steps between student steps).

    The real class and the student's (detached) x̂_{t_end} are re-noised to one t_adv in the
    segment and scored with the hinge loss. The real class is the clean data latents, or
    (``real="teacher"``) the consistency target x̂_{t_end}: the teacher's DDIM step then the
    EMA target's jump, the point of the teacher's trajectory the student is asked to reach;
    the heads then tell the student's jump from the trajectory's, not the data from anything
    the teacher makes.

    Args:
        discriminator: the heads over the frozen teacher.
        prediction: a ``tscd_predict`` result (may come from ``torch.no_grad()``).
        latents: the batch's clean latents x0.
        encoder_hidden_states: the captions' embeddings.
        alphas_cumprod: the ᾱ table.
        k: the stage's number of segments.
        final_alpha_cumprod: ᾱ at the clean end.
        real: the real class, ``"data"`` (``latents``) or ``"teacher"`` (the target x̂_{t_end}).
        generator: the random source.

    Returns ``discriminator_losses``' dict: ``loss``, ``real_logit``, ``fake_logit``.
    """
    ts = prediction.timesteps
    from_teacher = real == "teacher"
    real_noisy, fake, t_adv = adversarial_inputs(
        prediction.target_end if from_teacher else latents,
        prediction.student_end.detach(),
        ts.t_end,
        ts.t_b,
        k,
        alphas_cumprod,
        generator=generator,
        final_alpha_cumprod=final_alpha_cumprod,
        t_real=ts.t_end if from_teacher else None,
    )
    return discriminator_losses(discriminator, real_noisy, fake, t_adv, encoder_hidden_states)


@torch.no_grad()
def ema_update(
    target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float
) -> None:
    """θ⁻ ← decay · θ⁻ + (1 - decay) · θ, in place (one fused ``_foreach_lerp_``).

    Args:
        target_params: the EMA network's parameters θ⁻ (updated).
        online_params: the student's parameters θ, in the same order.
        decay: μ in [0, 1]; 1 keeps the target, 0 copies the student.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    targets = list(target_params)
    online = [p.detach().to(t.dtype) for p, t in zip(online_params, targets, strict=True)]
    if targets:
        torch._foreach_lerp_(targets, online, 1.0 - decay)
