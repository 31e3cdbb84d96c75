"""Every random draw of the objectives and the training sampler names its device.

On a GPU the loops pass a CUDA generator; a draw without ``device=`` lands on the default
device (the CPU) and fails there with "Expected a 'cpu' device type for generator" (the feedback
stage's first step did, on every GPU run). No CPU test can make a CUDA generator, so these tests
make the same mismatch the other way round: the generator and every tensor on the CPU, and
torch's *default* device switched to ``meta``. A draw that names its device (the generator's or
the tensors') is unaffected and gives the same numbers as without the switch; one that does not
makes a meta tensor, which fails as soon as it meets a CPU tensor or is read. (The base
model's ``denoising_losses`` is left out: diffusers' scheduler makes its own tensors there.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_objectives_solvers import AC, tiny_unet

from training.objectives.adversarial import TeacherFeatureDiscriminator
from training.objectives.dmd import (
    dmd_losses,
    fake_score_losses,
    gan_discriminator_losses,
    gan_generator_losses,
)
from training.objectives.feedback import denoised_x0_prediction, noised_x0_prediction
from training.objectives.lcm import lcm_losses
from training.objectives.solvers import offset_noise, sample_guidance, uniform_timesteps
from training.objectives.tscd import tscd_discriminator_losses, tscd_losses, tscd_predict

torch.set_num_threads(1)

UNET = tiny_unet()
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
EMPTY = torch.zeros(1, 5, 32)
# made here, outside the default-device switch, like every network of a run
DISC = TeacherFeatureDiscriminator(UNET, 8)


def _tscd(generator: torch.Generator) -> dict[str, torch.Tensor]:
    disc = DISC
    prediction = tscd_predict(
        UNET,
        UNET,
        UNET,
        AC,
        LATENTS,
        TEXT,
        k=2,
        skip=250,
        uncond_hidden_states=EMPTY,
        guidance_range=(3.0, 7.0),
        noise_offset=0.05,
        edge_probability=0.5,
        generator=generator,
    )
    losses = tscd_losses(
        prediction,
        LATENTS,
        TEXT,
        AC,
        k=2,
        discriminator=disc,
        adversarial_weight=1.0,
        generator=generator,
    )
    disc_losses = tscd_discriminator_losses(
        disc, prediction, LATENTS, TEXT, AC, k=2, real="teacher", generator=generator
    )
    return {"loss": losses["loss"], "disc": disc_losses["loss"]}


def _dmd(generator: torch.Generator) -> dict[str, torch.Tensor]:
    disc = DISC
    return {
        "dmd": dmd_losses(
            LATENTS,
            UNET,
            UNET,
            AC,
            TEXT,
            uncond_hidden_states=EMPTY,
            guidance=2.0,
            generator=generator,
        )["loss"],
        "fake": fake_score_losses(UNET, LATENTS, AC, TEXT, generator=generator)["loss"],
        "gan": gan_generator_losses(disc, LATENTS, AC, TEXT, generator=generator)["loss"],
        "disc": gan_discriminator_losses(
            disc, LATENTS, LATENTS + 0.1, AC, TEXT, generator=generator
        )["loss"],
    }


def _feedback(generator: torch.Generator) -> dict[str, torch.Tensor]:
    schedule = (999, 749, 499, 249)
    x0, x_t, _ = denoised_x0_prediction(
        UNET, AC, LATENTS, TEXT, schedule=schedule, generator=generator
    )
    renders, t = noised_x0_prediction(
        UNET, AC, LATENTS, TEXT, window=(100, 700), generator=generator
    )
    return {"x0": x0, "x_t": x_t, "renders": renders, "t": t}


def _lcm(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return lcm_losses(
        UNET, UNET, UNET, AC, LATENTS, TEXT, uncond_hidden_states=EMPTY, generator=generator
    )


def _solvers(generator: torch.Generator) -> dict[str, torch.Tensor]:
    cpu = torch.device("cpu")
    return {
        "t": uniform_timesteps(3, 0, 999, generator, cpu),
        "w": sample_guidance(3, (3.0, 7.0), generator, cpu),
        "noise": offset_noise(LATENTS, 0.1, generator),
    }


OBJECTIVES: dict[str, Callable[[torch.Generator], dict[str, torch.Tensor]]] = {
    "tscd": _tscd,
    "dmd": _dmd,
    "feedback": _feedback,
    "lcm": _lcm,
    "solvers": _solvers,
}


def _run(objective: Callable[[torch.Generator], dict[str, Any]]) -> dict[str, torch.Tensor]:
    return objective(torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_draws_follow_the_generator_not_the_default_device(name: str) -> None:
    expected = _run(OBJECTIVES[name])
    with torch.device("meta"):
        got = _run(OBJECTIVES[name])
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.device.type == "cpu", key
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_draw_without_a_device_is_caught() -> None:
    # what the feedback stage did before: no device, so the default one
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        int(torch.randint(0, 4, (1,), generator=generator).item())
