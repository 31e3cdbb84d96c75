"""Hyper-SD inference recipes as data.

A recipe is everything besides the weights that decides how a Hyper-SD model must be sampled: the
scheduler, the step counts it was distilled for, the guidance it expects, and extra call arguments
(TCD's `eta`, the 1-step SDXL UNet's fixed timestep). Getting one of these wrong does not fail
loudly, it just gives blurry or burnt images, so the recipes live here as validated data that the
registry, the gateway and the workers share.

This module imports neither torch nor diffusers (the gateway carries neither): the scheduler is
named by its diffusers class and built by `hypersd.pipeline.build_scheduler`, on the model side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

SchedulerName = Literal["DDIMScheduler", "TCDScheduler", "LCMScheduler"]

# DDIM defaults to clipping the predicted x0 to [-1, 1], which suits pixel-space models only: the
# real SD1.5 / SDXL scheduler configs turn it off, and a latent model's config may simply not
# mention it (a DDPM/Euler config has no such key), so the recipes turn it off explicitly.
_DDIM_TRAILING = MappingProxyType({"timestep_spacing": "trailing", "clip_sample": False})


@dataclass(frozen=True)
class Sampling:
    """A validated combination of recipe, steps, guidance and eta, ready for a pipeline call.

    Args:
        recipe: The recipe the values were validated against.
        steps: Number of denoising steps.
        guidance_scale: Classifier-free guidance scale; values <= 1 run without CFG.
        eta: TCD's stochasticity `eta` (`None` for recipes that take none).
    """

    recipe: Recipe
    steps: int
    guidance_scale: float
    eta: float | None = None

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a `StableDiffusion(XL)Pipeline.__call__`."""
        kwargs: dict[str, Any] = {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.eta is not None:
            kwargs["eta"] = self.eta
        if self.recipe.timesteps is not None:
            kwargs["timesteps"] = list(self.recipe.timesteps)
        return kwargs


@dataclass(frozen=True)
class Recipe:
    """How to sample from one kind of Hyper-SD weights.

    Args:
        name: The name that registry entries and API requests use.
        description: One line for people choosing a recipe.
        scheduler: The diffusers scheduler class. It is built from the model's own scheduler config
            so that the noise schedule (betas, prediction type) stays the model's.
        scheduler_kwargs: Config overrides for the scheduler, e.g. `timestep_spacing="trailing"`.
        steps: The step counts the weights were made for; any other count is refused.
        default_steps: Steps used when a request names none; one of `steps`.
        guidance_scale: Default classifier-free guidance scale. 0 means no CFG (one UNet pass per
            step), which is what the distilled N-step and 1-step weights expect.
        guidance_range: Inclusive `(min, max)` of the guidance scales that give sane images.
        negative_prompt: Whether negative prompts apply; they only do with CFG.
        eta: Default TCD `eta` (stochasticity, the paper's gamma); `None` if the recipe takes
            no eta.
        eta_range: Inclusive `(min, max)` of `eta`; required when `eta` is set.
        timesteps: Explicit timesteps for the pipeline call instead of the scheduler's spacing (a
            1-step UNet, Hyper-SDXL's or the Shapes one, is trained to denoise from t=800 only).
    """

    name: str
    description: str
    scheduler: SchedulerName
    steps: tuple[int, ...]
    default_steps: int
    guidance_scale: float = 0.0
    guidance_range: tuple[float, float] = (0.0, 0.0)
    negative_prompt: bool = False
    eta: float | None = None
    eta_range: tuple[float, float] | None = None
    timesteps: tuple[int, ...] | None = None
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.default_steps not in self.steps:
            raise ValueError(f"recipe {self.name!r}: default_steps must be one of its steps")
        if not self.guidance_range[0] <= self.guidance_scale <= self.guidance_range[1]:
            raise ValueError(f"recipe {self.name!r}: guidance_scale outside guidance_range")
        if (self.eta is None) != (self.eta_range is None):
            raise ValueError(f"recipe {self.name!r}: set both eta and eta_range, or neither")
        if self.timesteps is not None and self.steps != (len(self.timesteps),):
            raise ValueError(f"recipe {self.name!r}: explicit timesteps fix the step count")

    def resolve(
        self,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        *,
        negative_prompt: bool = False,
    ) -> Sampling:
        """Validate a request's sampling values against this recipe and fill in the defaults.

        Args:
            steps: Number of denoising steps; `None` for the recipe's default.
            guidance_scale: Classifier-free guidance scale; `None` for the recipe's default.
            eta: TCD `eta`; `None` for the recipe's default. Refused by recipes without eta.
            negative_prompt: Whether the request carries a negative prompt.

        Raises:
            ValueError: naming the field and the allowed values.
        """
        steps = self.default_steps if steps is None else steps
        if steps not in self.steps:
            raise ValueError(
                f"steps={steps} is not allowed for recipe {self.name!r}; "
                f"allowed: {format_steps(self.steps)}"
            )
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        low, high = self.guidance_range
        if not low <= guidance_scale <= high:
            allowed = f"{low:g}" if low == high else f"{low:g} to {high:g}"
            raise ValueError(
                f"guidance_scale={guidance_scale:g} is not allowed for recipe {self.name!r}; "
                f"allowed: {allowed}"
            )
        if self.eta is None or self.eta_range is None:
            if eta is not None:
                raise ValueError(
                    f"eta is not used by recipe {self.name!r}; "
                    f"recipes that take eta: {', '.join(_names(lambda r: r.eta is not None))}"
                )
        else:
            eta = self.eta if eta is None else eta
            if not self.eta_range[0] <= eta <= self.eta_range[1]:
                raise ValueError(
                    f"eta={eta:g} is not allowed for recipe {self.name!r}; "
                    f"allowed: {self.eta_range[0]:g} to {self.eta_range[1]:g}"
                )
        if negative_prompt and not self.negative_prompt:
            raise ValueError(
                f"negative_prompt is not supported by recipe {self.name!r} (it samples without "
                "classifier-free guidance); recipes with negative prompts: "
                f"{', '.join(_names(lambda r: r.negative_prompt))}"
            )
        if negative_prompt and guidance_scale <= 1:
            raise ValueError(
                "negative_prompt needs classifier-free guidance, i.e. guidance_scale > 1; "
                f"got guidance_scale={guidance_scale:g}"
            )
        return Sampling(recipe=self, steps=steps, guidance_scale=guidance_scale, eta=eta)


RECIPES: Mapping[str, Recipe] = MappingProxyType(
    {
        recipe.name: recipe
        for recipe in (
            Recipe(
                name="nstep-lora",
                description="Hyper-SD N-step LoRA: DDIM with trailing timesteps, no CFG",
                scheduler="DDIMScheduler",
                scheduler_kwargs=_DDIM_TRAILING,
                steps=(1, 2, 4, 8),
                default_steps=4,
            ),
            Recipe(
                name="unified-1step-lora",
                description="Hyper-SD unified 1-step LoRA: TCD at 1-8 steps, no CFG",
                scheduler="TCDScheduler",
                steps=tuple(range(1, 9)),
                default_steps=1,
                eta=1.0,  # Hyper-SD's examples; lower eta keeps more detail at more steps
                eta_range=(0.0, 1.0),
            ),
            Recipe(
                name="1step-unet",
                # Hyper-SDXL-1step-Unet's recipe; also the Shapes 1-step model (its LoRAs fused):
                # from t = 800, ᾱ is 8x larger than at 999, so an ε error weighs 5x in x̂0, not 15x
                description="Hyper-SD 1-step UNet: LCM from the fixed timestep 800, no CFG",
                scheduler="LCMScheduler",
                steps=(1,),
                default_steps=1,
                timesteps=(800,),
            ),
            Recipe(
                name="cfg-lora",
                description="Hyper-SD CFG-preserving LoRA: DDIM trailing, CFG and negative prompts",
                scheduler="DDIMScheduler",
                scheduler_kwargs=_DDIM_TRAILING,
                steps=(8, 12),
                default_steps=8,
                guidance_scale=5.0,
                guidance_range=(5.0, 8.0),
                negative_prompt=True,
            ),
            Recipe(
                name="teacher",
                description="The base model without distillation: DDIM trailing with CFG",
                scheduler="DDIMScheduler",
                scheduler_kwargs=_DDIM_TRAILING,
                # The distillation baselines run the teacher at 1-8 steps too.
                steps=tuple(range(1, 101)),
                default_steps=25,
                guidance_scale=5.0,
                guidance_range=(1.0, 15.0),
                negative_prompt=True,
            ),
        )
    }
)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`.

    Raises:
        ValueError: if there is no such recipe, listing the known ones.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def resolve(
    recipe: str,
    steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    *,
    negative_prompt: bool = False,
) -> Sampling:
    """Validate sampling values against the recipe called `recipe`; see `Recipe.resolve`.

    Args:
        recipe: The recipe's name.
        steps: Number of denoising steps; `None` for the recipe's default.
        guidance_scale: Classifier-free guidance scale; `None` for the recipe's default.
        eta: TCD `eta`; `None` for the recipe's default.
        negative_prompt: Whether the request carries a negative prompt.

    Raises:
        ValueError: naming the field and the allowed values.
    """
    return get_recipe(recipe).resolve(steps, guidance_scale, eta, negative_prompt=negative_prompt)


def format_steps(steps: Sequence[int]) -> str:
    """Compact, readable step lists for error messages: `1, 2, 4, 8` or `1-50`."""
    ordered = sorted(set(steps))
    runs: list[list[int]] = []
    for step in ordered:
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    return ", ".join(
        f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs
    )


def _names(predicate: Callable[[Recipe], bool]) -> list[str]:
    return [name for name, recipe in RECIPES.items() if predicate(recipe)]
