"""Load, fuse, unfuse and export LoRAs, in diffusers and kohya key layouts.

Hyper-SD's official LoRAs are kohya files (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`,
`.lora_up.weight`, `.alpha`, and `lora_te_...` for the text encoder), while our training writes
diffusers/peft ones. diffusers already converts kohya keys (`diffusers.loaders.
lora_conversion_utils`), so both go through diffusers' own loader; this module adds what a server
needs around it: safetensors only, a format check, a fix for mixed-layout diffusers files (see
`load_lora`), fusing several LoRAs with their scales, and unfusing to swap LoRAs without reloading
the base model.

Fusing bakes `W + scale * alpha / rank * B @ A` into the base weights, so a fused LoRA costs
nothing per step. The peft layers stay in place (merged) so that `unfuse_loras` can subtract the
LoRAs again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

# Imported from their modules: mypy reads diffusers' lazy top-level names as placeholder classes
# without attributes.
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from hypersd.registry import LoraSpec

SDPipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
"""The pipelines we serve; import it from here rather than typing `diffusers.X` names."""

# diffusers' own test for a kohya state dict (`lora_state_dict`), and the components of ours.
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def check_safetensors(path: Path) -> None:
    """Refuse anything but an existing `.safetensors` file: pickle files can run code on load."""
    if path.suffix != ".safetensors":
        raise ValueError(
            f"LoRA {str(path)!r}: only .safetensors files are loaded (pickle formats such as "
            ".bin, .pt and .ckpt are refused)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")


def detect_format(path: str | Path) -> Literal["diffusers", "kohya"]:
    """Tell a diffusers LoRA file from a kohya one by its keys (reads the header only).

    Raises:
        ValueError: if the file is neither, or not a `.safetensors` file.
    """
    path = Path(path)
    check_safetensors(path)
    with safetensors.safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())
    if keys and all(key.startswith(KOHYA_PREFIXES) for key in keys):
        return "kohya"
    if keys and all(key.startswith(DIFFUSERS_PREFIXES) and "lora" in key for key in keys):
        return "diffusers"
    raise ValueError(
        f"LoRA {str(path)!r} is in neither the diffusers layout (keys starting with "
        f"{', '.join(DIFFUSERS_PREFIXES)}) nor the kohya one (keys starting with "
        f"{', '.join(KOHYA_PREFIXES)}); first keys: {keys[:3]}"
    )


def load_lora(pipe: SDPipeline, lora: LoraSpec) -> None:
    """Load one LoRA into `pipe` as the peft adapter `lora.name`, without activating its scale.

    This is `pipe.load_lora_weights` spelled out, with one fix: diffusers converts the UNet keys
    to peft's layout only when the *first* key needs it, but the usual way of saving a diffusers
    LoRA (`convert_state_dict_to_diffusers` of a peft state dict) renames only the attention
    layers, so a LoRA that also covers convolutions mixes both layouts and its attention layers
    were dropped without a word. Here every UNet key is converted.

    Raises:
        ValueError: if the file is not `.safetensors` or its keys do not match `lora.format`.
    """
    found = detect_format(lora.path)
    if lora.format not in ("auto", found):
        raise ValueError(f"LoRA {lora.name!r}: format = {lora.format!r}, but the file is {found}")
    state_dict, network_alphas, metadata = pipe.lora_state_dict(
        str(lora.path.parent),
        weight_name=lora.path.name,
        use_safetensors=True,
        local_files_only=True,
        unet_config=pipe.unet.config,  # maps kohya's SGM block names (SDXL) to diffusers ones
        return_lora_metadata=True,
    )
    unet_layers = {key: value for key, value in state_dict.items() if key.startswith("unet.")}
    state_dict = {
        **{key: value for key, value in state_dict.items() if key not in unet_layers},
        **convert_unet_state_dict_to_peft(unet_layers),
    }
    pipe.load_lora_into_unet(
        state_dict,
        network_alphas=network_alphas,
        unet=pipe.unet,
        adapter_name=lora.name,
        metadata=metadata,
        low_cpu_mem_usage=True,
    )
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            pipe.load_lora_into_text_encoder(
                state_dict,
                network_alphas=network_alphas,
                text_encoder=encoder,
                prefix=component,
                adapter_name=lora.name,
                metadata=metadata,
                low_cpu_mem_usage=True,
            )


def fuse_loras(pipe: SDPipeline, loras: Sequence[LoraSpec]) -> None:
    """Load `loras` and fuse them into the base weights, each at its own scale."""
    if not loras:
        return
    for lora in loras:
        load_lora(pipe, lora)
    names = [lora.name for lora in loras]
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names)


def unfuse_loras(pipe: SDPipeline) -> None:
    """Subtract all fused LoRAs and remove their layers: `pipe` is the base model again."""
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def save_kohya_lora(
    path: str | Path,
    unet_lora_layers: Mapping[str, torch.Tensor] | None = None,
    text_encoder_lora_layers: Mapping[str, torch.Tensor] | None = None,
    text_encoder_2_lora_layers: Mapping[str, torch.Tensor] | None = None,
    *,
    alpha: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a LoRA in the kohya layout that the official Hyper-SD files and most UIs use.

    Args:
        path: The `.safetensors` file to write.
        unet_lora_layers: The UNet's LoRA state dict, in peft layout (`get_peft_model_state_dict`)
            or diffusers layout (`convert_state_dict_to_diffusers`), keys relative to the UNet.
        text_encoder_lora_layers: Likewise for the (first) text encoder.
        text_encoder_2_lora_layers: Likewise for SDXL's second text encoder.
        alpha: The LoRA alpha (peft's `lora_alpha`): the update is scaled by `alpha / rank`. `None`
            stores alpha = rank, i.e. scale 1, which is what an alpha-less diffusers file means.
        metadata: Extra string metadata for the file header.

    Raises:
        ValueError: if no layers are given, `path` is not `.safetensors`, or a layer name would
            not convert back through diffusers' kohya loader (the file would load wrongly).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA files are written as .safetensors, got {str(path)!r}")
    components = {
        "unet": unet_lora_layers,
        "text_encoder": text_encoder_lora_layers,
        "text_encoder_2": text_encoder_2_lora_layers,
    }
    peft_layers: dict[str, torch.Tensor] = {}
    for component, layers in components.items():
        if not layers:
            continue
        for key, value in convert_all_state_dict_to_peft(dict(layers)).items():
            if component != "unet" and not key.startswith(("text_model.", "text_projection.")):
                # Recent transformers flatten CLIPTextModel; kohya names keep `text_model`.
                key = f"text_model.{key}"
            peft_layers[f"{component}.{key}"] = value.detach().contiguous()
    if not peft_layers:
        raise ValueError("save_kohya_lora needs at least one non-empty set of LoRA layers")

    kohya = convert_state_dict_to_kohya(peft_layers)
    if not text_encoder_2_lora_layers:
        # kohya's SD1.x name for the only text encoder (`lora_te1_` is for SDXL's first one).
        kohya = {re.sub(r"^lora_te1_", "lora_te_", key): value for key, value in kohya.items()}
    for key in kohya:
        if key.endswith(".alpha"):
            rank = kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
            kohya[key] = torch.tensor(float(rank if alpha is None else alpha))
    _check_kohya_round_trip(kohya, peft_layers)

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(kohya, str(path), metadata=dict(metadata or {}))
    return path


def _check_kohya_round_trip(
    kohya: Mapping[str, torch.Tensor], peft_layers: Mapping[str, torch.Tensor]
) -> None:
    """Convert the kohya keys back the way `load_lora_weights` does and compare the layer names.

    kohya names replace every `.` with `_`, and diffusers' loader guesses the dots back from known
    layer names; a layer it guesses wrong (SDXL's `add_embedding`, for one) would load into the
    wrong place or fail, so such files are refused here rather than at serving time.
    """
    converted, _ = StableDiffusionPipeline.lora_state_dict(dict(kohya))
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    back = {f"unet.{key}" for key in convert_unet_state_dict_to_peft(unet)}
    for component in ("text_encoder", "text_encoder_2"):
        layers = {
            key.removeprefix(f"{component}."): value
            for key, value in converted.items()
            if key.startswith(f"{component}.")
        }
        if layers:
            peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(layers))
            back |= {f"{component}.{key}" for key in peft}

    def layer_names(keys: set[str]) -> set[str]:
        return {re.sub(r"\.lora_[AB]\.weight$", "", key) for key in keys}

    lost = sorted(layer_names(set(peft_layers)) - layer_names(back))
    if lost:
        raise ValueError(
            "these layers would not load back from a kohya file (diffusers cannot recover their "
            f"names); leave them out of the LoRA or save it in diffusers format: {lost}"
        )
