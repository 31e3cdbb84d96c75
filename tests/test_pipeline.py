"""Registry spec -> loaded Generator -> images, for every recipe, on the tiny pipelines."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from tiny_models import TinyModels

from hypersd.lora import unfuse_loras
from hypersd.pipeline import BatchResult, Generator, ImageRequest, load
from hypersd.registry import ModelSpec, Registry, load_registry

LoadModel = Callable[[str], Generator]


@pytest.fixture(scope="module")
def registry(tiny_models: TinyModels) -> Registry:
    return load_registry(tiny_models.registry)


@pytest.fixture(scope="module")
def load_model(registry: Registry) -> LoadModel:
    """Loads each registry model once per module (without warm-up, which has its own test)."""
    loaded: dict[str, Generator] = {}

    def get(name: str) -> Generator:
        if name not in loaded:
            loaded[name] = load(registry.get(name), warmup=False)
        return loaded[name]

    return get


def pixels(result: BatchResult) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.float32) for image in result.images]


def assert_same_images(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> None:
    """Equal up to rounding: batching may change float summation order, then 8-bit rounding."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.abs(x - y).max() <= 2


REQUESTS = [
    ImageRequest("a red circle on the left", seed=1),
    ImageRequest("two blue squares", seed=2, negative_prompt="green"),
    ImageRequest("a yellow triangle", seed=3),
]


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("sd15-teacher", {"steps": 2}),
        ("sd15-nstep", {"steps": 1}),
        ("sd15-nstep-kohya", {}),
        ("sd15-unified", {"steps": 2, "eta": 0.3}),
        ("sd15-cfg", {}),
        ("sdxl-teacher", {}),
        ("sdxl-1step", {}),
        ("sdxl-cfg", {"guidance_scale": 8.0}),
    ],
)
def test_every_recipe_generates(load_model: LoadModel, model: str, kwargs: dict) -> None:
    generator = load_model(model)
    negative = generator.spec.recipe_info.negative_prompt
    requests = REQUESTS[:2] if negative else REQUESTS[::2]
    result = generator.generate(requests, **kwargs)
    assert result.seeds == [request.seed for request in requests]
    assert [image.size for image in result.images] == [(64, 64)] * len(requests)
    assert all(np.asarray(image).std() > 0 for image in result.images)
    assert set(result.timings) == {"text_encoding", "denoising", "vae_decode", "total"}
    assert all(value >= 0 for value in result.timings.values())
    assert result.timings["total"] >= result.timings["denoising"]


def test_the_schedulers_follow_the_recipes(load_model: LoadModel) -> None:
    expected = {
        "sd15-teacher": "DDIMScheduler",
        "sd15-nstep": "DDIMScheduler",
        "sd15-unified": "TCDScheduler",
        "sd15-cfg": "DDIMScheduler",
        "sdxl-1step": "LCMScheduler",
    }
    for model, scheduler in expected.items():
        assert type(load_model(model).pipe.scheduler).__name__ == scheduler


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("sd15-teacher", {}),  # CFG with a negative prompt in the batch
        ("sd15-unified", {"steps": 2, "eta": 1.0}),  # TCD draws fresh noise between steps
        ("sdxl-teacher", {}),  # SDXL: "no negative prompt" must not depend on the batch
    ],
)
def test_a_batch_gives_the_images_of_one_by_one_generation(
    load_model: LoadModel, model: str, kwargs: dict
) -> None:
    generator = load_model(model)
    requests = REQUESTS if generator.spec.recipe_info.negative_prompt else REQUESTS[::2]
    batch = pixels(generator.generate(requests, **kwargs))
    alone = [pixels(generator.generate([request], **kwargs))[0] for request in requests]
    assert_same_images(batch, alone)
    # and the seeds matter
    assert np.abs(batch[0] - batch[-1]).max() > 10


def test_same_seed_same_image_other_seed_other_image(load_model: LoadModel) -> None:
    generator = load_model("sd15-nstep")
    first = pixels(generator.generate([ImageRequest("a red circle", seed=7)]))
    again = pixels(generator.generate([ImageRequest("a red circle", seed=7)]))
    other = pixels(generator.generate([ImageRequest("a red circle", seed=8)]))
    assert np.array_equal(first[0], again[0])
    assert np.abs(first[0] - other[0]).max() > 10


def test_tcd_eta_changes_multi_step_images(load_model: LoadModel) -> None:
    generator = load_model("sd15-unified")
    request = [ImageRequest("a red circle", seed=1)]
    low = pixels(generator.generate(request, steps=4, eta=0.0))
    high = pixels(generator.generate(request, steps=4, eta=1.0))
    assert np.abs(low[0] - high[0]).max() > 10


def test_the_fused_lora_changes_the_images_and_unfusing_restores_them(
    registry: Registry, load_model: LoadModel
) -> None:
    requests = [ImageRequest("a red circle", seed=1)]
    # The teacher's recipe at guidance 1 samples like nstep-lora: DDIM trailing, no CFG.
    base = pixels(load_model("sd15-teacher").generate(requests, steps=2, guidance_scale=1.0))
    with_lora = load(registry.get("sd15-nstep"), warmup=False)
    fused = pixels(with_lora.generate(requests, steps=2))
    assert np.abs(base[0] - fused[0]).max() > 10
    unfuse_loras(with_lora.pipe)
    assert_same_images(pixels(with_lora.generate(requests, steps=2)), base)


def test_the_1step_unet_file_replaces_the_base_unet(
    load_model: LoadModel, tiny_models: TinyModels
) -> None:
    unet = load_model("sdxl-1step").pipe.unet
    expected = safetensors.torch.load_file(tiny_models.sdxl_unet)
    assert all(torch.equal(unet.state_dict()[key], value) for key, value in expected.items())
    base_unet = load_model("sdxl-teacher").pipe.unet
    assert not torch.equal(base_unet.conv_in.weight, unet.conv_in.weight)


def test_loading_defaults_and_warmup(registry: Registry) -> None:
    generator = load(registry.get("sdxl-1step"))  # warm-up on
    assert isinstance(generator.pipe, StableDiffusionXLPipeline)
    assert generator.pipe.device.type == "cpu"
    assert generator.pipe.unet.dtype == torch.float32
    assert generator.spec.name == "sdxl-1step"


@pytest.mark.parametrize(
    ("model", "requests", "kwargs", "message"),
    [
        (
            "sd15-nstep",
            REQUESTS[:1],
            {"steps": 8},
            "steps=8 is not allowed for model 'sd15-nstep'; allowed: 1, 2, 4",
        ),
        (
            "sd15-nstep",
            REQUESTS[:1],
            {"width": 32},
            r"size \(width x height\) 32x64 is not "
            "allowed for model 'sd15-nstep'; allowed: 64x64, 64x32",
        ),
        (
            "sd15-nstep",
            REQUESTS[:1],
            {"guidance_scale": 2.0},
            "guidance_scale=2 is not allowed for recipe 'nstep-lora'; allowed: 0",
        ),
        ("sd15-nstep", REQUESTS[:1], {"eta": 0.5}, "eta is not used by recipe 'nstep-lora'"),
        ("sd15-nstep", REQUESTS[:2], {}, "negative_prompt is not supported by recipe 'nstep-lora'"),
        (
            "sd15-unified",
            REQUESTS[:1],
            {"eta": -0.1},
            "eta=-0.1 is not allowed for recipe 'unified-1step-lora'; allowed: 0 to 1",
        ),
        ("sdxl-1step", REQUESTS[:1], {"steps": 4}, "allowed: 1$"),
        (
            "sd15-teacher",
            REQUESTS[:2],
            {"guidance_scale": 1.0},
            "negative_prompt needs classifier-free guidance",
        ),
        ("sd15-nstep", [ImageRequest("x", seed=-1)], {}, "seed=-1 is out of range"),
        ("sd15-nstep", [], {}, "at least one ImageRequest"),
    ],
)
def test_invalid_values_raise_value_errors_naming_the_field(
    load_model: LoadModel, model: str, requests: list, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(model).generate(requests, **kwargs)


def test_missing_weights_name_the_model_and_path(registry: Registry) -> None:
    with pytest.raises(FileNotFoundError, match=r"model 'missing': path .*no-such-folder"):
        load(registry.get("missing"))


def test_hub_ids_are_read_from_the_local_cache_only(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}
    repo = tmp_path / "models--hypersd--tiny-sd15"
    commit = "0" * 40
    shutil.copytree(tiny_models.sd15, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    spec = ModelSpec(
        name="hub", family="sd15", hub_id="hypersd/tiny-sd15", recipe="nstep-lora", sizes=["64x64"]
    )
    generator = load(spec, warmup=False)
    assert generator.generate([ImageRequest("a red circle", seed=1)]).images[0].size == (64, 64)
    with pytest.raises(OSError):  # not in the cache, and never downloaded
        load(spec.model_copy(update={"hub_id": "hypersd/not-cached"}), warmup=False)
