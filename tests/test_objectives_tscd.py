"""TSCD: segment edges, the timestep sampler, the boundary case, gradients, EMA."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from test_objectives_solvers import AC, FixedX0Net, tiny_unet

from training.objectives.adversarial import (
    TeacherFeatureDiscriminator,
    sample_adversarial_timesteps,
)
from training.objectives.solvers import Distance, add_noise, renoise
from training.objectives.tscd import (
    AdversarialReal,
    TSCDTimesteps,
    ema_update,
    sample_tscd_timesteps,
    segment_lower_edge,
    segment_start_timestep,
    tscd_discriminator_losses,
    tscd_losses,
    tscd_predict,
)

torch.set_num_threads(1)
T = 1000


@settings(max_examples=200, deadline=None)
@given(t=st.integers(0, T - 1), k=st.sampled_from([1, 2, 4, 8]))
def test_segment_lower_edge(t: int, k: int) -> None:
    width = T // k
    edge = int(segment_lower_edge(torch.tensor([t]), k, T)[0])
    assert edge % width == 0 and edge <= t < edge + width
    assert segment_lower_edge(t, k, T) == edge
    assert int(segment_start_timestep(torch.tensor([t]), k, T)[0]) == edge - 1


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_segment_edges_are_the_trailing_ddim_timesteps(k: int) -> None:
    """The k-step student's jumps are exactly the ones DDIM 'trailing' makes at k steps."""
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(k)
    tops = scheduler.timesteps  # e.g. 999, 749, 499, 249 at k = 4
    starts = segment_start_timestep(tops, k, T)
    assert starts.tolist() == [*tops.tolist()[1:], -1]


@settings(max_examples=60, deadline=None)
@given(
    k=st.sampled_from([1, 2, 4, 8]),
    skip=st.sampled_from([1, 5, 25, 125]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampled_timesteps_lie_in_the_segment(k: int, skip: int, seed: int) -> None:
    width = T // k
    ts = sample_tscd_timesteps(64, k, skip, T, torch.Generator().manual_seed(seed))
    assert bool(((ts.t_n + 1) % skip == 0).all()) and bool(((ts.t_end + 1) % skip == 0).all())
    assert bool((ts.t_n >= skip - 1).all()) and bool((ts.t_n <= T - 1).all())
    assert torch.equal(ts.t_prev, ts.t_n - skip)
    assert torch.equal(ts.t_b, torch.div(ts.t_n, width, rounding_mode="floor") * width - 1)
    assert bool(((ts.t_b + 1) % width == 0).all())
    assert bool((ts.t_b <= ts.t_end).all()) and bool((ts.t_end <= ts.t_prev).all())
    assert bool((ts.t_n > ts.t_b).all()) and bool((ts.t_n <= ts.t_b + width).all())


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_t_end_covers_the_whole_range(k: int) -> None:
    ts = sample_tscd_timesteps(400_000, k, 25, T, torch.Generator().manual_seed(k))
    assert bool((ts.t_end == ts.t_b).any()) and bool((ts.t_end == ts.t_prev).any())
    assert set(ts.t_b.unique().tolist()) == {j * T // k - 1 for j in range(k)}
    # given t_n, t_end is uniform over the grid points of [t_b, t_{n-1}]
    top = ts.t_n == T - 1
    choices = (T // k) // 25
    counts = torch.bincount((ts.t_end[top] - ts.t_b[top]) // 25, minlength=choices)
    assert len(counts) == choices and float(counts.min()) > 0.8 * float(counts.float().mean())


def test_sampler_rejects_off_grid_edges() -> None:
    with pytest.raises(ValueError):
        sample_tscd_timesteps(4, 8, 20, T)  # T/k = 125 is not a multiple of 20
    with pytest.raises(ValueError):
        segment_lower_edge(torch.tensor([3]), 3, T)


def _fixed(t_n: list[int], t_end: list[int], k: int, skip: int) -> TSCDTimesteps:
    t = torch.tensor(t_n)
    return TSCDTimesteps(
        t_n=t, t_prev=t - skip, t_end=torch.tensor(t_end), t_b=segment_start_timestep(t, k, T)
    )


class ConstantNet:
    """A mock network that predicts the same garbage epsilon everywhere."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> Any:
        return SimpleNamespace(sample=torch.full_like(x, 3.0))


def test_boundary_target_is_the_teachers_step() -> None:
    """At t_end = t_{n-1} the target is x_{t_{n-1}}, whatever the target network says."""
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    # the third sample sits at the clean end: t_n = 24, t_{n-1} = t_end = -1
    ts = _fixed([999, 524, 24], [974, 499, -1], k=4, skip=25)
    teacher = FixedX0Net(latents, AC)  # the oracle: its DDIM step lands on q(x_{t_{n-1}} | x0)
    p = tscd_predict(
        ConstantNet(),
        ConstantNet(),
        teacher,
        AC,
        latents,
        torch.zeros(3, 5, 32),
        k=4,
        skip=25,
        noise=noise,
        timesteps=ts,
    )
    torch.testing.assert_close(p.target_end, p.x_prev)
    torch.testing.assert_close(
        p.x_prev, add_noise(latents, noise, ts.t_prev, AC), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(p.x_prev[2], latents[2], atol=1e-4, rtol=0)


def test_oracle_networks_have_zero_loss_and_the_target_is_carried_to_t_end() -> None:
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    ts = _fixed([999, 749, 374, 124], [749, 499, 249, -1], k=4, skip=25)
    oracle = FixedX0Net(latents, AC)
    p = tscd_predict(
        oracle,
        oracle,
        oracle,
        AC,
        latents,
        torch.zeros(4, 5, 32),
        k=4,
        skip=25,
        noise=noise,
        timesteps=ts,
    )
    expected = add_noise(latents, noise, ts.t_end, AC)
    torch.testing.assert_close(p.target_end, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(p.student_end, expected, atol=1e-4, rtol=0)
    # the target network was asked at t_{n-1}; the student at t_n
    assert [c.tolist() for c in oracle.calls] == [
        ts.t_n.tolist(),
        ts.t_n.tolist(),
        ts.t_prev.tolist(),
    ]


def test_tscd_loss_terms_and_distance_kinds() -> None:
    latents = torch.randn(2, 4, 8, 8)
    oracle = FixedX0Net(latents, AC)
    cond = torch.zeros(2, 5, 32)

    def losses_of(student: FixedX0Net, kind: Distance = "mse") -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        p = tscd_predict(student, oracle, oracle, AC, latents, cond, k=2, skip=25)
        return tscd_losses(p, latents, cond, AC, k=2, distance_kind=kind, generator=generator)

    zero = losses_of(oracle)
    assert float(zero["loss"]) < 1e-8 and set(zero) >= {"loss", "distance", "t_n", "t_end"}
    off = FixedX0Net(latents + 1.0, AC)
    kinds: tuple[Distance, ...] = ("mse", "huber")
    for kind in kinds:
        losses = losses_of(off, kind)
        assert float(losses["loss"]) > 0 and all(v.dim() == 0 for v in losses.values())


def _requires_grad_everywhere(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(True)


def test_backward_reaches_only_the_student() -> None:
    student, teacher = tiny_unet(0), tiny_unet(1)
    target = copy.deepcopy(student)
    _requires_grad_everywhere(student, teacher, target)
    latents, cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    generator = torch.Generator().manual_seed(0)
    prediction = tscd_predict(
        student,
        target,
        teacher,
        AC,
        latents,
        cond,
        k=4,
        skip=25,
        uncond_hidden_states=uncond,
        guidance_range=(2.0, 6.0),
        noise_offset=0.1,
        generator=generator,
    )
    losses = tscd_losses(prediction, latents, cond, AC, k=4, distance_kind="huber")
    losses["loss"].backward()
    assert 2.0 <= float(losses["guidance"]) <= 6.0
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *target.parameters()])


def test_adversarial_term_trains_the_student_through_the_frozen_teacher() -> None:
    student, teacher = tiny_unet(0), tiny_unet(1)
    target = copy.deepcopy(student)
    discriminator = TeacherFeatureDiscriminator(teacher, hidden_channels=16)
    _requires_grad_everywhere(student, target)
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    generator = torch.Generator().manual_seed(0)
    prediction = tscd_predict(student, target, teacher, AC, latents, cond, k=1, skip=25)
    losses = tscd_losses(
        prediction,
        latents,
        cond,
        AC,
        k=1,
        discriminator=discriminator,
        adversarial_weight=0.5,
        generator=generator,
    )
    expected = losses["distance"] + 0.5 * losses["adversarial"]
    assert float(losses["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    losses["loss"].backward()
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *target.parameters()])


def test_ema_update() -> None:
    target = [torch.zeros(3), torch.full((2, 2), 4.0)]
    online = [torch.ones(3), torch.zeros(2, 2)]
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))
    torch.testing.assert_close(target[1], torch.full((2, 2), 3.6))
    ema_update(target, online, 1.0)
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target[1], online[1])
    # on modules' parameters (which require grad) and with repeated updates: μ^n decay
    student, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    start = [p.detach().clone() for p in ema.parameters()]
    for _ in range(3):
        ema_update(ema.parameters(), student.parameters(), 0.5)
    for p, p0, q in zip(ema.parameters(), start, student.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), 0.125 * p0 + 0.875 * q.detach())
        assert p.grad is None
    with pytest.raises(ValueError):
        ema_update(target, online, 1.5)


def test_discriminator_step_on_a_tscd_prediction_trains_the_heads_only() -> None:
    student, teacher = tiny_unet(0), tiny_unet(1)
    discriminator = TeacherFeatureDiscriminator(teacher, hidden_channels=16)
    student.requires_grad_(True)
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    g = torch.Generator().manual_seed(0)
    prediction = tscd_predict(
        student, student, teacher, AC, latents, cond, k=2, skip=25, generator=g
    )
    losses = tscd_discriminator_losses(
        discriminator, prediction, latents, cond, AC, k=2, generator=g
    )
    losses["loss"].backward()
    assert set(losses) == {"loss", "real_logit", "fake_logit"}
    assert all(p.grad is not None for p in discriminator.heads.parameters())
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])


def test_edge_probability_trains_the_samplers_jump_more_often() -> None:
    """p = 0 draws exactly today's timesteps; p = 1 puts every t_end at the segment's edge;
    p = 0.5 at k = 1 makes x0 the target of about 0.5 + 0.5 · 0.107 of the samples."""

    def draw(p: float, k: int = 1, n: int = 4000) -> TSCDTimesteps:
        g = torch.Generator().manual_seed(3)
        return sample_tscd_timesteps(n, k, 25, T, g, edge_probability=p)

    today = sample_tscd_timesteps(4000, 1, 25, T, torch.Generator().manual_seed(3))
    assert torch.equal(draw(0.0).t_end, today.t_end) and torch.equal(draw(0.0).t_n, today.t_n)
    for k in (1, 2, 4):
        every = draw(1.0, k)
        assert torch.equal(every.t_end, every.t_b)
    uniform_share = float((today.t_end == -1).float().mean())
    assert uniform_share == pytest.approx(0.107, abs=0.02)  # H(40) / 40
    half = draw(0.5)
    assert float((half.t_end == -1).float().mean()) == pytest.approx(
        0.5 + 0.5 * uniform_share, abs=0.03
    )
    assert torch.equal(half.t_n, today.t_n)  # only t_end changes
    with pytest.raises(ValueError, match="edge_probability"):
        draw(1.5)


def test_teacher_trajectory_as_the_real_class() -> None:
    """``real="teacher"``: the heads' real input is the consistency target x̂_{t_end} carried to
    t_adv, not the data; with data it is q(x_{t_adv} | x0) as before."""
    student, teacher = tiny_unet(0), tiny_unet(1)
    discriminator = TeacherFeatureDiscriminator(teacher, hidden_channels=8)
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    prediction = tscd_predict(
        student, student, teacher, AC, latents, cond, k=1, skip=25,
        timesteps=_fixed([999, 524], [499, 249], k=1, skip=25),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    inputs: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))

    def real_input(real: AdversarialReal) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            tscd_discriminator_losses(
                discriminator, prediction, latents, cond, AC, k=1, real=real, generator=g
            )
        return inputs[-1][:2]

    g = torch.Generator().manual_seed(1)
    t_adv = sample_adversarial_timesteps(
        prediction.timesteps.t_end, prediction.timesteps.t_b, 1, T, g
    )
    noise = torch.randn((2, 2, 4, 8, 8), generator=g)[0]
    torch.testing.assert_close(real_input("data"), add_noise(latents, noise, t_adv, AC))
    expected = renoise(prediction.target_end, prediction.timesteps.t_end, t_adv, noise, AC)
    torch.testing.assert_close(real_input("teacher"), expected)
