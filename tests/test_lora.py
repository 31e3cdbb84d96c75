"""LoRA loading, fusing, unfusing and kohya export, on the tiny pipelines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from tiny_models import (
    LORA_RANK,
    UNET_LORA_TARGETS,
    TinyModels,
    random_lora_layers,
    tiny_sdxl_unet,
)

from hypersd.lora import (
    detect_format,
    fuse_loras,
    load_lora,
    save_kohya_lora,
    unfuse_loras,
)
from hypersd.registry import LoraSpec

Render = Callable[[], np.ndarray]


def renderer(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> Render:
    """A fixed 2-step, no-CFG generation of `pipe`, as a float array."""
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        output = pipe(
            "a red circle",
            num_inference_steps=2,
            guidance_scale=0.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return output.images[0]

    return render


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def sd15(tiny_models: TinyModels) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_models.sd15, use_safetensors=True)


@pytest.fixture
def clean_sd15(sd15: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The module's SD1.5 pipeline, with every LoRA removed again after the test."""
    yield sd15
    unfuse_loras(sd15)


def lora(path: Path, name: str = "lora", scale: float = 1.0, **kwargs: str) -> LoraSpec:
    return LoraSpec(name=name, path=path, scale=scale, **kwargs)


def test_formats_are_detected(tiny_models: TinyModels) -> None:
    assert detect_format(tiny_models.sd15_lora) == "diffusers"
    assert detect_format(tiny_models.sd15_kohya) == "kohya"
    assert detect_format(tiny_models.sdxl_kohya) == "kohya"


def test_only_safetensors_files_are_loaded(tiny_models: TinyModels, tmp_path: Path) -> None:
    pickled = tmp_path / "lora.bin"
    torch.save({"unet.x.lora.down.weight": torch.zeros(1)}, pickled)
    for suffix in (".bin", ".pt", ".ckpt"):
        with pytest.raises(ValueError, match=r"only \.safetensors files are loaded"):
            detect_format(pickled.with_suffix(suffix))
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.safetensors")
    not_a_lora = tmp_path / "unet.safetensors"
    safetensors.torch.save_file({"conv_in.weight": torch.zeros(1)}, not_a_lora)
    with pytest.raises(ValueError, match="neither the diffusers layout"):
        detect_format(not_a_lora)


def test_the_declared_format_must_match(
    clean_sd15: StableDiffusionPipeline, tiny_models: TinyModels
) -> None:
    with pytest.raises(ValueError, match="format = 'kohya', but the file is diffusers"):
        load_lora(clean_sd15, lora(tiny_models.sd15_lora, format="kohya"))


def test_every_layer_of_a_mixed_layout_diffusers_file_is_loaded(
    clean_sd15: StableDiffusionPipeline, tiny_models: TinyModels
) -> None:
    """`convert_state_dict_to_diffusers` renames only attention layers, so the file mixes
    `to_q.lora.down` and `conv1.lora_A` keys; plain `load_lora_weights` drops the attention ones."""
    with safetensors.safe_open(tiny_models.sd15_lora, framework="pt") as file:
        keys = list(file.keys())
    assert any(".to_q.lora.down." in key for key in keys)
    assert any(".conv1.lora_A." in key for key in keys)

    load_lora(clean_sd15, lora(tiny_models.sd15_lora))
    loaded = get_peft_model_state_dict(clean_sd15.unet, adapter_name="lora")
    assert len(loaded) == len([key for key in keys if key.startswith("unet.")])
    assert any(".to_q.lora_A." in key for key in loaded)


def test_fuse_changes_the_output_and_unfuse_restores_it(
    clean_sd15: StableDiffusionPipeline, tiny_models: TinyModels
) -> None:
    render = renderer(clean_sd15)
    base = render()
    fuse_loras(clean_sd15, [lora(tiny_models.sd15_lora)])
    fused = render()
    assert max_diff(base, fused) > 0.05
    unfuse_loras(clean_sd15)
    assert max_diff(base, render()) < 1e-4


def test_kohya_and_diffusers_files_of_one_lora_give_the_same_images(
    clean_sd15: StableDiffusionPipeline, tiny_models: TinyModels
) -> None:
    render = renderer(clean_sd15)
    fuse_loras(clean_sd15, [lora(tiny_models.sd15_lora)])
    from_diffusers = render()
    unfuse_loras(clean_sd15)
    fuse_loras(clean_sd15, [lora(tiny_models.sd15_kohya, format="kohya")])
    assert max_diff(from_diffusers, render()) < 1e-4

    # alpha = rank / 2 halves the update, exactly like fusing at scale 0.5
    unfuse_loras(clean_sd15)
    fuse_loras(clean_sd15, [lora(tiny_models.sd15_kohya_half)])
    half_alpha = render()
    unfuse_loras(clean_sd15)
    fuse_loras(clean_sd15, [lora(tiny_models.sd15_lora, scale=0.5)])
    assert max_diff(half_alpha, render()) < 1e-4
    assert max_diff(half_alpha, from_diffusers) > 0.05


def test_several_loras_fuse_at_their_own_scales(
    clean_sd15: StableDiffusionPipeline, tiny_models: TinyModels
) -> None:
    render = renderer(clean_sd15)
    first, second = tiny_models.sd15_lora, tiny_models.sd15_lora_2
    fuse_loras(clean_sd15, [lora(first, "a")])
    only_first = render()
    unfuse_loras(clean_sd15)
    fuse_loras(clean_sd15, [lora(first, "a"), lora(second, "b", scale=0.0)])
    assert max_diff(only_first, render()) < 1e-4
    unfuse_loras(clean_sd15)
    fuse_loras(clean_sd15, [lora(first, "a"), lora(second, "b", scale=0.7)])
    both = render()
    assert max_diff(only_first, both) > 0.05
    assert sorted(clean_sd15.get_list_adapters()["unet"]) == ["a", "b"]


def test_sdxl_kohya_lora_covers_both_text_encoders(tiny_models: TinyModels) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl, use_safetensors=True)
    render = renderer(pipe)
    base = render()
    fuse_loras(pipe, [lora(tiny_models.sdxl_kohya)])
    assert pipe.get_list_adapters() == {
        "unet": ["lora"],
        "text_encoder": ["lora"],
        "text_encoder_2": ["lora"],
    }
    assert max_diff(base, render()) > 0.05
    unfuse_loras(pipe)
    assert max_diff(base, render()) < 1e-4


def test_kohya_files_use_the_official_key_names(tiny_models: TinyModels) -> None:
    with safetensors.safe_open(tiny_models.sd15_kohya, framework="pt") as file:
        keys = set(file.keys())
        prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= keys
        assert file.get_tensor(f"{prefix}.alpha").item() == LORA_RANK
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    with safetensors.safe_open(tiny_models.sd15_kohya_half, framework="pt") as file:
        assert file.get_tensor(f"{prefix}.alpha").item() == LORA_RANK / 2
    with safetensors.safe_open(tiny_models.sdxl_kohya, framework="pt") as file:
        keys = set(file.keys())
    prefixes = {key.split("_text_model")[0] for key in keys if "_text_model" in key}
    assert prefixes == {"lora_te1", "lora_te2"}


def test_save_kohya_lora_checks_its_input(tmp_path: Path) -> None:
    layers = random_lora_layers(tiny_sdxl_unet(), ["to_q"], rank=2, alpha=2, seed=0)
    path = save_kohya_lora(tmp_path / "a.safetensors", layers, metadata={"ss_network_dim": "2"})
    with safetensors.safe_open(path, framework="pt") as file:
        assert file.metadata()["ss_network_dim"] == "2"

    with pytest.raises(ValueError, match=r"written as \.safetensors"):
        save_kohya_lora(tmp_path / "a.pt", layers)
    with pytest.raises(ValueError, match="at least one non-empty set"):
        save_kohya_lora(tmp_path / "b.safetensors")
    # kohya names lose their dots; diffusers cannot put them back for SDXL's add_embedding
    unloadable = random_lora_layers(
        tiny_sdxl_unet(), [*UNET_LORA_TARGETS, "linear_1"], rank=2, alpha=2, seed=0
    )
    with pytest.raises(ValueError, match=r"would not load back .*'unet.add_embedding.linear_1'"):
        save_kohya_lora(tmp_path / "c.safetensors", unloadable)
