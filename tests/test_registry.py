"""The model registry: the shipped file, the TOML schema, `extends`, and its error messages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypersd.registry import (
    DEFAULT_REGISTRY_PATH,
    LoraSpec,
    ModelSpec,
    RegistryError,
    UnknownModelError,
    load_registry,
)

BASE = """
default = "base"

[models.base]
family = "sd15"
path = "weights/base"
recipe = "teacher"
steps = "1..50"
default_steps = 25
sizes = ["64x64", [128, 64]]
"""


def write_registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(textwrap.dedent(text))
    return path


def registry_error(tmp_path: Path, entry: str) -> str:
    """The message of the error that the base registry plus `entry` raises."""
    with pytest.raises(RegistryError) as excinfo:
        load_registry(write_registry(tmp_path, BASE + textwrap.dedent(entry)))
    return str(excinfo.value)


def test_the_shipped_default_is_a_distilled_model_on_the_shapes_base_weights() -> None:
    """A request naming no model gets a distilled model (LoRAs on the teacher, no CFG, a few
    steps); which one is the registry's `default` line (docs/distillation.md, "The table,
    measured")."""
    registry = load_registry()
    spec = registry.get()
    assert spec.name == registry.default != "shapes-base"
    assert spec.path == DEFAULT_REGISTRY_PATH.parent / "shapes-base"
    assert spec.recipe != "teacher" and spec.loras
    assert spec.guidance_scale == 0.0
    assert spec.default_steps <= 8 and 25 not in spec.steps
    assert spec.sizes == ((64, 64),) and spec.default_size == (64, 64)
    assert all(
        lora.path.parent == DEFAULT_REGISTRY_PATH.parent / "shapes-hyper" for lora in spec.loras
    )


def test_the_shipped_4step_model_is_tscd_plus_feedback_at_4_steps() -> None:
    spec = load_registry().get("shapes-hyper-4step")
    assert spec.recipe == "nstep-lora"
    assert (spec.steps, spec.default_steps, spec.guidance_scale) == ((4,), 4, 0.0)
    assert [lora.name for lora in spec.loras] == ["tscd-4step", "feedback-4step"]


def test_the_shipped_registry_serves_the_shapes_base_teacher_by_name() -> None:
    spec = load_registry().get("shapes-base")
    assert spec.name == "shapes-base"
    assert spec.family == "sd15"
    assert spec.path == DEFAULT_REGISTRY_PATH.parent / "shapes-base"
    assert spec.recipe == "teacher"
    assert spec.steps == tuple(range(1, 51))
    assert spec.default_steps == 25
    assert spec.sizes == ((64, 64),)
    assert spec.default_size == (64, 64)
    assert spec.guidance_scale == 2.0  # measured best for this model (docs/base-model.md)
    assert spec.backend == "onnxruntime"  # measured faster than eager, same images
    assert spec.loras == ()


def test_the_registry_path_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPERSD_REGISTRY", str(write_registry(tmp_path, BASE)))
    assert load_registry().names == ["base"]


def test_defaults_relative_paths_and_sizes(tmp_path: Path) -> None:
    registry = load_registry(
        write_registry(
            tmp_path,
            BASE
            + """
            [models.xl]
            family = "sdxl"
            hub_id = "stabilityai/stable-diffusion-xl-base-1.0"
            unet = "hyper/Hyper-SDXL-1step-Unet.safetensors"
            recipe = "1step-unet"
            """,
        )
    )
    base = registry.get("base")
    assert base.path == tmp_path / "weights" / "base"
    assert base.sizes == ((64, 64), (128, 64))
    assert base.default_size == (64, 64)
    assert base.guidance_scale == 5.0  # the teacher recipe's

    xl = registry.get("xl")
    assert xl.path is None and xl.hub_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert xl.unet == tmp_path / "hyper" / "Hyper-SDXL-1step-Unet.safetensors"
    assert (xl.steps, xl.default_steps, xl.guidance_scale) == ((1,), 1, 0.0)
    assert xl.sizes == ((1024, 1024),)  # the family's native size


def test_a_lora_model_is_one_small_block(tmp_path: Path) -> None:
    registry = load_registry(
        write_registry(
            tmp_path,
            BASE
            + """
            [models.hyper-1step]
            extends = "base"
            recipe = "unified-1step-lora"
            loras = [{ name = "hyper-1step", path = "loras/hyper.safetensors", scale = 0.8 }]
            """,
        )
    )
    spec = registry.get("hyper-1step")
    base = registry.get("base")
    # base weights, sizes and backend are inherited...
    assert (spec.family, spec.path, spec.sizes, spec.backend) == (
        base.family,
        base.path,
        base.sizes,
        base.backend,
    )
    # ...how to sample is the new recipe's
    assert (spec.steps, spec.default_steps, spec.guidance_scale) == (tuple(range(1, 9)), 1, 0.0)
    assert spec.loras == (
        LoraSpec(name="hyper-1step", path=tmp_path / "loras" / "hyper.safetensors", scale=0.8),
    )


def test_a_child_with_its_own_weights_replaces_the_parents(tmp_path: Path) -> None:
    registry = load_registry(
        write_registry(
            tmp_path,
            BASE
            + """
            [models.other]
            extends = "base"
            single_file = "other.safetensors"
            recipe = "teacher"
            """,
        )
    )
    spec = registry.get("other")
    assert spec.path is None
    assert spec.single_file == tmp_path / "other.safetensors"


def test_unknown_and_path_like_model_names(tmp_path: Path) -> None:
    registry = load_registry(write_registry(tmp_path, BASE))
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; known models: base$"):
        registry.get("nope")
    for name in ("../base", "/etc/passwd", "weights/base", "C:\\models\\base", ".base"):
        with pytest.raises(KeyError) as excinfo:
            registry.get(name)
        assert "never by file path" in str(excinfo.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "lcm"',
            "unknown recipe 'lcm'; known recipes: nstep-lora",
        ),
        ('[models.x]\nfamily = "sd15"\npath = "x"', "recipe is required"),
        ('[models.x]\nfamily = "sd3"\npath = "x"\nrecipe = "teacher"', "models.x.family"),
        (
            '[models.x]\nfamily = "sd15"\nrecipe = "teacher"',
            "exactly one of path, single_file, hub_id",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nhub_id = "a/b"\nrecipe = "teacher"',
            "exactly one of path",
        ),
        ('[models.x]\nfamily = "sd15"\nhub_id = "../x"\nrecipe = "teacher"', "models.x.hub_id"),
        (
            '[models.x]\nfamily = "sd15"\nsingle_file = "x.ckpt"\nrecipe = "teacher"',
            "single_file must be a .safetensors file",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nunet = "unet.bin"\nrecipe = "teacher"',
            "unet must be a .safetensors file or a diffusers folder",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\n'
            'loras = [{ name = "a", path = "a.pt" }]',
            "models.x.loras.0.path",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\n'
            'loras = [{ name = "../a", path = "a.safetensors" }]',
            "models.x.loras.0.name",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\n'
            'loras = [{ name = "a", path = "a.safetensors", format = "lycoris" }]',
            "models.x.loras.0.format",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\n'
            'loras = [{ name = "a", path = "a.safetensors" },\n'
            '  { name = "a", path = "b.safetensors" }]',
            "names must be unique",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "nstep-lora"\nsteps = [1, 3]',
            "steps: recipe 'nstep-lora' allows 1, 2, 4, 8, got 1, 3",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "nstep-lora"\nsteps = "1-4"',
            "a range 'A..B'",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "nstep-lora"\nsteps = [1, 2]\n'
            "default_steps = 4",
            "default_steps=4 is not one of steps (1, 2)",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "cfg-lora"\nguidance_scale = 2.0',
            "guidance_scale=2 is not allowed for recipe 'cfg-lora'; allowed: 5 to 8",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nsizes = ["500x500"]',
            "multiples of 8",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nsizes = ["big"]',
            "'WIDTHxHEIGHT'",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nsizes = ["64x64"]\n'
            'default_size = "128x128"',
            "default_size=128x128 is not one of sizes (64x64)",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nbackend = "cuda"',
            "models.x.backend",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nbackend = "trt"',
            "models.x.backend\n  Input should be 'eager', 'onnxruntime', 'compile' or 'tensorrt'",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nbatch_sizes = [0]',
            "batch_sizes: positive integers, got [0]",
        ),
        (
            '[models.x]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"\nlora = "a.safetensors"',
            "models.x.lora\n  Extra inputs are not permitted",
        ),
        (
            '[models.x]\nextends = "nope"\nrecipe = "teacher"',
            "models.x.extends: unknown model 'nope'",
        ),
        (
            '[models.x]\nextends = "y"\nrecipe = "teacher"\n[models.y]\nextends = "x"\n'
            'recipe = "teacher"',
            "cycle x -> y -> x",
        ),
        ('[models."a/b"]\nfamily = "sd15"\npath = "x"\nrecipe = "teacher"', "models.a/b.name"),
    ],
)
def test_errors_name_the_entry_and_field(tmp_path: Path, entry: str, message: str) -> None:
    assert message in registry_error(tmp_path, entry)


def test_registry_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="default='nope' is not a model; models: base"):
        load_registry(write_registry(tmp_path, BASE.replace('"base"', '"nope"', 1)))
    with pytest.raises(RegistryError, match="Invalid value"):
        load_registry(write_registry(tmp_path, "default = "))
    with pytest.raises(FileNotFoundError):
        load_registry(tmp_path / "missing.toml")


def test_request_values_are_checked_against_the_spec(tmp_path: Path) -> None:
    spec = load_registry(write_registry(tmp_path, BASE)).get("base")
    assert spec.resolve_size() == (64, 64)
    assert spec.resolve_size(128, 64) == (128, 64)
    assert spec.resolve_size(height=64) == (64, 64)
    with pytest.raises(
        ValueError, match=r"size .* 64x128 is not allowed for model 'base'; allowed: 64x64, 128x64"
    ):
        spec.resolve_size(64, 128)

    sampling = spec.resolve_sampling()
    assert (sampling.steps, sampling.guidance_scale) == (25, 5.0)
    with pytest.raises(ValueError, match="steps=60 is not allowed for model 'base'; allowed: 1-50"):
        spec.resolve_sampling(steps=60)
    with pytest.raises(ValueError, match="allowed: 1 to 15"):
        spec.resolve_sampling(guidance_scale=20)


def test_a_spec_can_be_built_in_code() -> None:
    spec = ModelSpec(name="m", family="sdxl", hub_id="org/model", recipe="nstep-lora", steps=[4])
    assert (spec.steps, spec.default_steps, spec.sizes) == ((4,), 4, ((1024, 1024),))


def test_registry_and_recipes_import_no_torch() -> None:
    """The gateway image has no torch: these modules must import without it."""
    code = (
        "import sys, hypersd.registry, hypersd.recipes; "
        "hypersd.registry.load_registry(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
