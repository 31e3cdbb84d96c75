"""Named model specs, read from a TOML file.

Requests name models; the registry maps a name to everything a worker needs to load and sample it:
base weights, optional UNet override, LoRAs, recipe, allowed steps and sizes, and the backend.
Nothing from a request is ever used as a file path: paths come only from the TOML file, and
requests pick models (and through them LoRAs) by name.

This module imports neither torch nor diffusers (the gateway image carries neither), and it checks
no files on disk: the gateway validates requests against a registry whose weights live on the
workers only. Missing weights are reported when a worker loads the model.

The file::

    default = "shapes-base"

    [models.shapes-base]
    family = "sd15"
    path = "shapes-base"              # diffusers folder, relative to this file
    recipe = "teacher"
    steps = "1..50"
    default_steps = 25
    sizes = ["64x64"]
    guidance_scale = 5.0

    [models.shapes-hyper-1step]
    extends = "shapes-base"           # same base weights, sizes and backend
    recipe = "unified-1step-lora"
    loras = [{ name = "hyper-1step", path = "shapes-hyper-1step.safetensors" }]
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hypersd.recipes import RECIPES, Recipe, Sampling, format_steps, get_recipe

Family = Literal["sd15", "sdxl"]
# The backends `hypersd.pipeline.load` can run (`hypersd.backends`). `tensorrt` needs TensorRT and
# a CUDA GPU; where they are missing it falls back to eager (or fails, with `strict`).
Backend = Literal["eager", "onnxruntime", "compile", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The backends that run float32 ONNX exports, built once into the artefact cache
# (`hypersd.backends.build_artefact`, `hypersd build-engine`).
ARTEFACT_BACKENDS: tuple[str, ...] = ("onnxruntime", "tensorrt")
# Precisions of a TensorRT engine's layers ("auto": half precision, float16).
EnginePrecision = Literal["auto", "float32", "float16", "bfloat16"]
LoraFormat = Literal["auto", "diffusers", "kohya"]
Size = tuple[int, int]

DEFAULT_REGISTRY_PATH = Path(__file__).resolve().parent.parent / "models" / "registry.toml"
REGISTRY_ENV = "HYPERSD_REGISTRY"

# Names of models and LoRAs: no slashes and no leading dot, so a name can never be read as a path.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# Families' native sizes, used when an entry lists none.
_FAMILY_SIZES: dict[str, Size] = {"sd15": (512, 512), "sdxl": (1024, 1024)}
# What `extends` copies from the parent entry: the base model, not how it is sampled.
_INHERITED = (
    "family",
    "path",
    "single_file",
    "hub_id",
    "unet",
    "sizes",
    "default_size",
    "backend",
    "static_shapes",
    "strict",
    "precision",
    "batch_sizes",
)
_SOURCES = ("path", "single_file", "hub_id")


class UnknownModelError(KeyError):
    """A request named a model that the registry does not hold."""

    def __init__(self, name: str, known: list[str]) -> None:
        message = f"unknown model {name!r}; known models: {', '.join(known)}"
        if not NAME_PATTERN.fullmatch(name):
            message += " (models are chosen by registry name, never by file path)"
        super().__init__(message)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument, quotes and all.
        return str(self.args[0])


class RegistryError(ValueError):
    """The registry file is missing a value, has a wrong one, or is not valid TOML."""


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the registry file's folder (`base_dir` in the context)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return path


def _require_safetensors(path: Path | None, field: str, *, folder_ok: bool = False) -> None:
    """Refuse pickle-based weight files: loading one can run arbitrary code."""
    if path is None or path.suffix == ".safetensors" or (folder_ok and not path.suffix):
        return
    wanted = "a .safetensors file or a diffusers folder" if folder_ok else "a .safetensors file"
    raise ValueError(f"{field} must be {wanted} (pickle formats are refused), got {str(path)!r}")


def _parse_size(value: Any) -> Any:
    """Accept "WxH" or [width, height]."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if match is None:
            raise ValueError(f"a size is written 'WIDTHxHEIGHT', e.g. '512x512', got {value!r}")
        return int(match[1]), int(match[2])
    return value


def _check_size(size: Size) -> Size:
    for side in size:
        if side % 8 or not 8 <= side <= 4096:
            raise ValueError(
                f"sizes must be multiples of 8 from 8 to 4096, got {format_size(size)}"
            )
    return size


def format_size(size: Size) -> str:
    """`(512, 768)` -> `"512x768"`."""
    return f"{size[0]}x{size[1]}"


class LoraSpec(BaseModel):
    """A LoRA fused into a model at load time.

    Args:
        name: The adapter's name (lower-case letters, digits, `.`, `_`, `-`), used in logs and
            by requests.
        path: The `.safetensors` file, relative to the registry file.
        scale: Fusing weight; Hyper-SD's LoRAs are made for 1.0.
        format: Key layout: `diffusers` (what `save_lora_weights` writes), `kohya` (`lora_unet_...`,
            as in the official Hyper-SD files), or `auto` to detect it from the keys.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN.pattern)
    path: Path
    scale: float = 1.0
    format: LoraFormat = "auto"

    _resolve = field_validator("path", mode="before")(_resolve_path)

    @field_validator("path")
    @classmethod
    def _safetensors_only(cls, path: Path) -> Path:
        _require_safetensors(path, "path")
        return path

    @field_validator("scale")
    @classmethod
    def _finite(cls, scale: float) -> float:
        if not math.isfinite(scale):
            raise ValueError("scale must be a finite number")
        return scale


class ModelSpec(BaseModel):
    """Everything needed to load and sample one named model.

    Args:
        name: The registry name (the key under `[models]`).
        family: `sd15` (StableDiffusionPipeline) or `sdxl` (StableDiffusionXLPipeline).
        path: Base weights as a local diffusers folder, relative to the registry file.
        single_file: Base weights as one `.safetensors` checkpoint (original SD layout).
        hub_id: Base weights as a Hugging Face repo id, read from the local HF cache only.
            Exactly one of `path`, `single_file` and `hub_id` is set.
        unet: Optional UNet replacing the base one: a diffusers UNet folder or a `.safetensors`
            state dict in diffusers layout (the Hyper-SDXL 1-step UNet is such a file).
        loras: LoRAs fused at load time, in order.
        recipe: The sampling recipe's name (see `hypersd.recipes.RECIPES`).
        steps: Allowed step counts, a subset of the recipe's; a list or a range "A..B".
            Defaults to all of the recipe's.
        default_steps: Steps when a request names none; defaults to the recipe's default.
        guidance_scale: Default guidance scale; defaults to the recipe's.
        sizes: Allowed output sizes as "WxH" strings or [width, height] pairs; defaults to the
            family's native size.
        default_size: Size when a request names none; defaults to the first of `sizes`.
        backend: What runs the text encoder(s), UNet and VAE decoder (`hypersd.backends`):
            `eager` (plain diffusers), `onnxruntime` (ONNX exports with the LoRAs fused, built
            once into the artefact cache), `compile` (torch.compile) or `tensorrt` (TensorRT
            engines built from those exports; CUDA only).
        static_shapes: `compile`: compile for the shapes seen, with CUDA graphs on CUDA, instead
            of dynamic shapes. `tensorrt`: one optimisation profile per batch size and size
            (each replayed as a CUDA graph) instead of one dynamic profile per size.
        precision: `tensorrt` only: the engine's layer precision ("auto" is float16).
        batch_sizes: `tensorrt`: the image batch sizes its profiles cover (a dynamic
            profile covers 1 to the largest; CFG doubles the UNet's batch, which is covered);
            other batches run padded up to the next listed size, or in chunks of the largest.
            `compile` with `static_shapes`: the batch sizes compiled (at load); other batches
            run padded up to the next listed size. Keep the largest at the workers'
            `HYPERSD_MAX_BATCH_SIZE`: a batch runs at up to the largest listed size.
        strict: Fail the load when the backend cannot be built or loaded, instead of falling
            back to eager with a warning.
        series: The series this model belongs to (e.g. `shapes-hyper`): the same model at
            several step counts, which a request names with `"steps": "auto"` and a deadline
            to get the member with the most steps (its `default_steps`) that meets it.
        sla_ms: The default deadline (milliseconds from submission to finish) of this model's
            requests that set no `deadline_ms`: one predicted to miss it is refused at once.
            None: no deadline by default.
        description: One line for people choosing a model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN.pattern)
    family: Family
    path: Path | None = None
    single_file: Path | None = None
    hub_id: str | None = Field(default=None, pattern=HUB_ID_PATTERN.pattern)
    unet: Path | None = None
    loras: tuple[LoraSpec, ...] = ()
    recipe: str
    steps: tuple[int, ...]
    default_steps: int
    guidance_scale: float
    sizes: tuple[Size, ...]
    default_size: Size
    backend: Backend = "eager"
    static_shapes: bool = False
    strict: bool = False
    precision: EnginePrecision = "auto"
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    series: str | None = Field(default=None, pattern=NAME_PATTERN.pattern)
    sla_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    description: str = ""

    _resolve = field_validator("path", "single_file", "unet", mode="before")(_resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Fill the defaults that depend on other fields: the recipe's and the family's."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "recipe" not in data:
            # Steps and guidance default from the recipe: one clear error instead of four.
            raise ValueError(f"recipe is required; known recipes: {', '.join(RECIPES)}")
        if isinstance(data["recipe"], str):
            recipe = get_recipe(data["recipe"])
            data.setdefault("steps", recipe.steps)
            data.setdefault("default_steps", recipe.default_steps)
            data.setdefault("guidance_scale", recipe.guidance_scale)
        if data.get("family") in _FAMILY_SIZES:
            data.setdefault("sizes", [_FAMILY_SIZES[data["family"]]])
        if isinstance(data.get("sizes"), list | tuple) and data["sizes"]:
            data.setdefault("default_size", data["sizes"][0])
        return data

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
            if match is None:
                raise ValueError(f"steps is a list of integers or a range 'A..B', got {value!r}")
            return tuple(range(int(match[1]), int(match[2]) + 1))
        return value

    @field_validator("sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        return [_parse_size(size) for size in value] if isinstance(value, list) else value

    @field_validator("default_size", mode="before")
    @classmethod
    def _parse_default_size(cls, value: Any) -> Any:
        return _parse_size(value)

    @field_validator("sizes")
    @classmethod
    def _check_sizes(cls, sizes: tuple[Size, ...]) -> tuple[Size, ...]:
        return tuple(_check_size(size) for size in sizes)

    @field_validator("steps")
    @classmethod
    def _sort_steps(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        if not steps:
            raise ValueError("steps must not be empty")
        return tuple(sorted(set(steps)))

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        """Check the fields against each other."""
        sources = [field for field in _SOURCES if getattr(self, field) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"exactly one of {', '.join(_SOURCES)} must be set, got {sources or 'none'}"
            )
        _require_safetensors(self.single_file, "single_file")
        _require_safetensors(self.unet, "unet", folder_ok=True)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes: positive integers, got {list(self.batch_sizes)}")
        lora_names = [lora.name for lora in self.loras]
        if len(set(lora_names)) != len(lora_names):
            raise ValueError(f"loras: names must be unique, got {lora_names}")

        recipe = self.recipe_info
        if not set(self.steps) <= set(recipe.steps):
            raise ValueError(
                f"steps: recipe {recipe.name!r} allows {format_steps(recipe.steps)}, "
                f"got {format_steps(self.steps)}"
            )
        if self.default_steps not in self.steps:
            raise ValueError(
                f"default_steps={self.default_steps} is not one of steps "
                f"({format_steps(self.steps)})"
            )
        recipe.resolve(self.default_steps, self.guidance_scale)
        if self.default_size not in self.sizes:
            raise ValueError(
                f"default_size={format_size(self.default_size)} is not one of sizes "
                f"({', '.join(map(format_size, self.sizes))})"
            )
        return self

    @property
    def recipe_info(self) -> Recipe:
        """The `Recipe` object named by `recipe`."""
        return get_recipe(self.recipe)

    def resolve_sampling(
        self,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        *,
        negative_prompt: bool = False,
    ) -> Sampling:
        """Validate a request's sampling values for this model and fill in its defaults.

        Args:
            steps: Number of denoising steps; `None` for `default_steps`.
            guidance_scale: Classifier-free guidance scale; `None` for the model's default.
            eta: TCD `eta`; `None` for the recipe's default.
            negative_prompt: Whether the request carries a negative prompt.

        Raises:
            ValueError: naming the field and the allowed values.
        """
        steps = self.default_steps if steps is None else steps
        if steps not in self.steps:
            raise ValueError(
                f"steps={steps} is not allowed for model {self.name!r}; "
                f"allowed: {format_steps(self.steps)}"
            )
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return self.recipe_info.resolve(steps, guidance_scale, eta, negative_prompt=negative_prompt)

    def resolve_size(self, width: int | None = None, height: int | None = None) -> Size:
        """Validate a request's output size, filling a missing side from `default_size`.

        Raises:
            ValueError: naming the allowed sizes.
        """
        size = (
            self.default_size[0] if width is None else width,
            self.default_size[1] if height is None else height,
        )
        if size not in self.sizes:
            raise ValueError(
                f"size (width x height) {format_size(size)} is not allowed for model "
                f"{self.name!r}; allowed: {', '.join(map(format_size, self.sizes))}"
            )
        return size


class Registry(BaseModel):
    """The named models a deployment serves.

    Args:
        default: The model used when a request names none.
        models: The specs by name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str
    models: dict[str, ModelSpec]

    @model_validator(mode="before")
    @classmethod
    def _expand_entries(cls, data: Any) -> Any:
        """Name each entry after its key and apply `extends`."""
        if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
            return data
        return {**data, "models": _expand_extends(data["models"])}

    @model_validator(mode="after")
    def _check_default(self) -> Registry:
        if not self.models:
            raise ValueError("models: the registry holds no models")
        if self.default not in self.models:
            raise ValueError(
                f"default={self.default!r} is not a model; models: {', '.join(self.models)}"
            )
        return self

    @model_validator(mode="after")
    def _check_series(self) -> Registry:
        """A series name is no model's name, and its members' step counts are distinct."""
        for name in self.series_names:
            if name in self.models:
                raise ValueError(f"series {name!r} has the name of a model; name it otherwise")
            steps = [spec.default_steps for spec in self.series(name)]
            if len(set(steps)) != len(steps):
                members = [spec.name for spec in self.series(name)]
                raise ValueError(
                    f"series {name!r}: its models {members} must have distinct default_steps, "
                    f"got {steps}"
                )
        return self

    @property
    def series_names(self) -> list[str]:
        """The series the models belong to, in file order."""
        return list(dict.fromkeys(s.series for s in self.models.values() if s.series is not None))

    def series(self, name: str) -> list[ModelSpec]:
        """The models of series `name`, fewest steps (`default_steps`) first; [] for none."""
        members = [spec for spec in self.models.values() if spec.series == name]
        return sorted(members, key=lambda spec: spec.default_steps)

    @property
    def names(self) -> list[str]:
        """Model names in file order."""
        return list(self.models)

    def get(self, name: str | None = None) -> ModelSpec:
        """The spec called `name`, or the default model's when `name` is None.

        Raises:
            UnknownModelError: listing the known names.
        """
        name = self.default if name is None else name
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, self.names) from None


def _expand_extends(models: Mapping[str, Any]) -> dict[str, Any]:
    """Copy the base-model fields (`_INHERITED`) of `extends` parents into their children.

    A child that names its own weights source (`path`, `single_file` or `hub_id`) replaces the
    parent's. Recipe, steps, guidance, LoRAs and description are never inherited: they describe
    how a model is sampled, which is what a child entry changes.
    """
    expanded: dict[str, Any] = {}

    def expand(name: str, chain: tuple[str, ...]) -> Any:
        if name in expanded:
            return expanded[name]
        entry = models[name]
        if not isinstance(entry, Mapping):
            return entry  # field validation reports the wrong type
        entry = {**entry, "name": name}
        parent = entry.pop("extends", None)
        if parent is not None:
            if parent not in models:
                raise ValueError(
                    f"models.{name}.extends: unknown model {parent!r}; models: {', '.join(models)}"
                )
            if parent in chain:
                raise ValueError(f"models.{name}.extends: cycle {' -> '.join((*chain, parent))}")
            inherited = {
                key: value
                for key, value in expand(parent, (*chain, parent)).items()
                if key in _INHERITED
                and not (key in _SOURCES and any(source in entry for source in _SOURCES))
            }
            entry = inherited | entry
        expanded[name] = entry
        return entry

    for name in models:
        expand(name, (name,))
    return expanded


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate a registry file.

    Args:
        path: The TOML file. Defaults to `$HYPERSD_REGISTRY`, else the repository's
            `models/registry.toml`. Relative paths inside it are resolved against its folder.

    Raises:
        RegistryError: if the file is not valid TOML or a value is wrong (the message names the
            entry and field).
    """
    path = Path(path or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_PATH)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
        return Registry.model_validate(data, context={"base_dir": path.resolve().parent})
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise RegistryError(f"invalid model registry {path}: {exc}") from exc
