"""The Hyper-SD recipes: defaults, validation messages and the schedulers they build."""

from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from hypothesis import given
from hypothesis import strategies as st

from hypersd.pipeline import build_scheduler
from hypersd.recipes import RECIPES, Recipe, format_steps, get_recipe, resolve

# What the official Hyper-SD model cards prescribe.
EXPECTED = {
    "nstep-lora": (DDIMScheduler, (1, 2, 4, 8), 0.0),
    "unified-1step-lora": (TCDScheduler, tuple(range(1, 9)), 0.0),
    "1step-unet": (LCMScheduler, (1,), 0.0),
    "cfg-lora": (DDIMScheduler, (8, 12), 5.0),
    "teacher": (DDIMScheduler, tuple(range(1, 101)), 5.0),
}

# SDXL's own scheduler config: Euler, "leading" spacing, and no `clip_sample` key at all.
SDXL_SCHEDULER = EulerDiscreteScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


def test_the_recipe_table() -> None:
    assert set(RECIPES) == set(EXPECTED)
    for name, (scheduler_cls, steps, guidance) in EXPECTED.items():
        recipe = RECIPES[name]
        scheduler = build_scheduler(recipe, SDXL_SCHEDULER.config)
        assert type(scheduler) is scheduler_cls
        assert recipe.steps == steps
        assert recipe.guidance_scale == guidance
        # the model's noise schedule is kept
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.beta_end == 0.012


def test_ddim_recipes_use_trailing_spacing_without_x0_clipping() -> None:
    for name in ("nstep-lora", "cfg-lora", "teacher"):
        scheduler = build_scheduler(RECIPES[name], SDXL_SCHEDULER.config)
        assert scheduler.config.timestep_spacing == "trailing"
        assert scheduler.config.clip_sample is False
    scheduler = build_scheduler(RECIPES["nstep-lora"], SDXL_SCHEDULER.config)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]  # 1 step starts from pure noise


def test_defaults_and_call_kwargs() -> None:
    nstep = resolve("nstep-lora")
    assert nstep.call_kwargs() == {"num_inference_steps": 4, "guidance_scale": 0.0}

    tcd = resolve("unified-1step-lora", steps=4, eta=0.3)
    assert tcd.call_kwargs() == {"num_inference_steps": 4, "guidance_scale": 0.0, "eta": 0.3}
    assert resolve("unified-1step-lora").eta == 1.0  # Hyper-SD's examples, not diffusers' 0.3

    lcm = resolve("1step-unet")
    assert lcm.call_kwargs() == {
        "num_inference_steps": 1,
        "guidance_scale": 0.0,
        "timesteps": [800],
    }
    scheduler = build_scheduler(RECIPES["1step-unet"], SDXL_SCHEDULER.config)
    scheduler.set_timesteps(timesteps=[800])
    assert scheduler.timesteps.tolist() == [800]

    cfg = resolve("cfg-lora", steps=12, guidance_scale=7.5, negative_prompt=True)
    assert (cfg.steps, cfg.guidance_scale) == (12, 7.5)
    teacher = resolve("teacher")
    assert (teacher.steps, teacher.guidance_scale) == (25, 5.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recipe": "lcm"}, "unknown recipe 'lcm'; known recipes: nstep-lora, unified-1step-lora"),
        (
            {"recipe": "nstep-lora", "steps": 3},
            "steps=3 is not allowed for recipe 'nstep-lora'; allowed: 1, 2, 4, 8",
        ),
        ({"recipe": "teacher", "steps": 101}, "allowed: 1-100"),
        ({"recipe": "1step-unet", "steps": 2}, "allowed: 1"),
        (
            {"recipe": "nstep-lora", "guidance_scale": 3.0},
            "guidance_scale=3 is not allowed for recipe 'nstep-lora'; allowed: 0",
        ),
        ({"recipe": "cfg-lora", "guidance_scale": 9.0}, "allowed: 5 to 8"),
        (
            {"recipe": "unified-1step-lora", "eta": 1.5},
            "eta=1.5 is not allowed for recipe 'unified-1step-lora'; allowed: 0 to 1",
        ),
        (
            {"recipe": "nstep-lora", "eta": 0.5},
            "eta is not used by recipe 'nstep-lora'; recipes that take eta: unified-1step-lora",
        ),
        (
            {"recipe": "nstep-lora", "negative_prompt": True},
            "negative_prompt is not supported by recipe 'nstep-lora'",
        ),
        (
            {"recipe": "teacher", "guidance_scale": 1.0, "negative_prompt": True},
            "negative_prompt needs classifier-free guidance, i.e. guidance_scale > 1",
        ),
    ],
)
def test_errors_name_the_field_and_the_allowed_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve(**kwargs)


def test_get_recipe() -> None:
    assert get_recipe("teacher") is RECIPES["teacher"]
    with pytest.raises(ValueError, match="known recipes"):
        get_recipe("../teacher")


def test_inconsistent_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="default_steps"):
        Recipe(name="x", description="", scheduler="DDIMScheduler", steps=(1,), default_steps=2)
    with pytest.raises(ValueError, match="explicit timesteps"):
        Recipe(
            name="x",
            description="",
            scheduler="LCMScheduler",
            steps=(1, 2),
            default_steps=1,
            timesteps=(800,),
        )


@given(name=st.sampled_from(sorted(RECIPES)), steps=st.integers(-5, 120))
def test_steps_are_accepted_exactly_when_allowed(name: str, steps: int) -> None:
    recipe = RECIPES[name]
    if steps in recipe.steps:
        assert recipe.resolve(steps).steps == steps
    else:
        with pytest.raises(ValueError, match=f"allowed: {format_steps(recipe.steps)}"):
            recipe.resolve(steps)


@given(guidance=st.floats(allow_nan=True))
def test_guidance_outside_the_range_is_refused(guidance: float) -> None:
    recipe = RECIPES["cfg-lora"]
    if 5.0 <= guidance <= 8.0:
        assert recipe.resolve(guidance_scale=guidance).guidance_scale == guidance
    else:
        with pytest.raises(ValueError, match="guidance_scale"):
            recipe.resolve(guidance_scale=guidance)


def test_format_steps() -> None:
    assert format_steps([8, 1, 2, 4]) == "1, 2, 4, 8"
    assert format_steps(range(1, 51)) == "1-50"
    assert format_steps([1, 2, 5, 6, 7, 12]) == "1, 2, 5-7, 12"
