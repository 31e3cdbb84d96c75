"""Export a trained LoRA: diffusers-format safetensors, kohya format, and a registry entry.

The diffusers file is written in peft's key layout (``unet.<module>.lora_A.weight``) with the
LoRA config as metadata, through ``save_lora_weights``. This is deliberate: the usual
``convert_state_dict_to_diffusers`` renames only the attention layers, so a LoRA that also
covers convolutions mixes two layouts, and diffusers 0.42's ``load_lora_weights`` converts the
keys only when the *first* key needs it -- silently dropping the attention layers (see
``hypersd.lora.load_lora``). One consistent peft layout loads completely in both plain diffusers
and ``hypersd.lora.load_lora``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from hypersd.lora import save_kohya_lora
from hypersd.recipes import RECIPES


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in peft layout, keys relative to the UNet, on the CPU."""
    return {
        key: value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(unet).items()
    }


def save_peft_lora(path: str | Path, layers: Mapping[str, torch.Tensor]) -> Path:
    """The raw peft state dict (what a training stage hands to the next one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in layers.items()}, str(path))
    return path


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA file as a peft-layout UNet state dict: our raw files or diffusers-format ones."""
    state = load_file(str(path))
    if any(key.startswith("unet.") for key in state):
        unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        return dict(convert_unet_state_dict_to_peft(unet))
    return state


def load_lora_into(unet: torch.nn.Module, layers: Mapping[str, torch.Tensor]) -> None:
    """Copy ``layers`` into the UNet's (already added) LoRA adapter; every layer must match."""
    result = set_peft_model_state_dict(unet, dict(layers))
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if unexpected:
        raise ValueError(f"LoRA layers not in this UNet's adapter: {unexpected[:5]}")


def save_diffusers_lora(
    path: str | Path,
    layers: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
) -> Path:
    """A diffusers-format LoRA file that ``pipe.load_lora_weights`` reads (SD1.5 and SDXL alike).

    Args:
        path: the ``.safetensors`` file to write.
        layers: the UNet's LoRA in peft layout (``lora_state_dict``).
        rank: the LoRA rank r.
        alpha: peft's ``lora_alpha`` (stored in the metadata, so the scale alpha / r survives).
        target_modules: the adapted modules (metadata).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {str(path)!r}")
    metadata: dict[str, Any] = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # SDXL's save_lora_weights writes the same "unet." keys; one writer serves both families.
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=dict(layers),
        weight_name=path.name,
        unet_lora_adapter_metadata=metadata,
    )
    return path


def export_lora(
    folder: str | Path,
    name: str,
    layers: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` (diffusers) and ``<name>-kohya.safetensors`` in ``folder``."""
    folder = Path(folder)
    diffusers_file = save_diffusers_lora(
        folder / f"{name}.safetensors",
        layers,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
    )
    kohya_file = save_kohya_lora(
        folder / f"{name}-kohya.safetensors",
        dict(layers),
        alpha=alpha,
        metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)},
    )
    return diffusers_file, kohya_file


def registry_entry(
    name: str,
    loras: str | list[tuple[str, str]],
    *,
    base: str,
    steps: int,
    recipe: str = "nstep-lora",
    description: str = "",
) -> str:
    """The ``models/registry.toml`` block that serves an exported LoRA over its base model.

    Args:
        name: The entry's model name.
        loras: One LoRA file, or ``(name, file)`` pairs fused in that order (e.g. the TSCD LoRA,
            then the feedback LoRA over it); files are relative to the registry file.
        base: The entry it extends (base weights, sizes, backend).
        steps: The step count of an N-step LoRA (recipe ``nstep-lora``: DDIM trailing).
        recipe: ``nstep-lora``; ``unified-1step-lora`` (the unified 1-step LoRA or an LCM-style
            LoRA: TCD at 1, 2, 4, 8 steps); or ``1step-unet`` (one step from t = 800).
        description: One line (default: the recipe's).
    """
    steps_lines = {
        "nstep-lora": f"steps = [{steps}]\ndefault_steps = {steps}\n",
        "unified-1step-lora": "steps = [1, 2, 4, 8]\ndefault_steps = 1\n",
        "1step-unet": "",  # the recipe's: 1 step
    }
    if recipe not in steps_lines:
        raise ValueError(f"recipe must be one of {', '.join(steps_lines)}; got {recipe!r}")
    if isinstance(loras, str):
        loras = [(name.removeprefix(f"{base}-") or name, loras)]
    text = description or f"{base} + {RECIPES[recipe].description}"
    return (
        f"[models.{name}]\n"
        f'description = "{text}"\n'
        f'extends = "{base}"\n'
        f'recipe = "{recipe}"\n'
        f"{steps_lines[recipe]}"
        "loras = ["
        + ", ".join(f'{{ name = "{lora}", path = "{file}" }}' for lora, file in loras)
        + "]\n"
    )


def save_half(source: str | Path, destination: str | Path) -> Path:
    """A copy of a LoRA file with its float tensors in fp16 (metadata kept): half the bytes to
    ship; loaders cast the weights to the pipeline's dtype."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(destination), metadata=metadata)
    return destination


if __name__ == "__main__":
    import sys

    # python -m training.lora_export SOURCE DESTINATION: ship a LoRA in fp16 (Makefile: ship-shapes)
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m training.lora_export SOURCE DESTINATION (.safetensors)")
    print(save_half(sys.argv[1], sys.argv[2]))
