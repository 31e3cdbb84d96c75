"""The teacher: the base pipeline every stage starts from, and its text conditioning.

``load_teacher`` reads a diffusers folder (SD1.5 or SDXL) or a registry model (its LoRAs fused).
``build_encoder`` turns captions into the one tensor every network of a stage is called with,
``unet(x, t, encoder_hidden_states)``: SD1.5's text embeddings as they are, SDXL's with the
pooled embedding and size ids packed into one extra token (``PackedConditioning``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)

from hypersd.lora import SDPipeline, fuse_loras
from hypersd.pipeline import load_pipeline
from hypersd.registry import load_registry


def load_teacher(teacher: str, registry: str | None = None) -> SDPipeline:
    """The base pipeline on the CPU: a diffusers folder, or a registry model (LoRAs fused)."""
    folder = Path(teacher)
    if (folder / "model_index.json").exists():
        index = json.loads((folder / "model_index.json").read_text())
        pipe: SDPipeline
        if "XL" in index.get("_class_name", ""):
            pipe = StableDiffusionXLPipeline.from_pretrained(
                folder, use_safetensors=True, local_files_only=True, add_watermarker=False
            )
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                use_safetensors=True,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        return pipe
    spec = load_registry(registry).get(teacher)
    pipe = load_pipeline(spec, torch.float32)
    fuse_loras(pipe, spec.loras)
    return pipe


class PackedConditioning:
    """SDXL's added conditioning (pooled text embedding, size/crop ids) as one extra text token.

    The objectives call every network as ``unet(x, t, encoder_hidden_states)``; for an SDXL
    UNet the pooled embedding and time ids ride along as the last token of the hidden states,
    through every concatenation (guided teacher, discriminator), and a forward pre-hook unpacks
    them into ``added_cond_kwargs`` (calls that pass ``added_cond_kwargs``, like the pipeline's,
    are left alone).
    """

    def __init__(self, pooled_dim: int, resolution: int) -> None:
        self.pooled_dim = pooled_dim
        self.time_ids = torch.tensor(
            [resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32
        )

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n, _, width = embeds.shape
        if self.pooled_dim + 6 > width:
            raise ValueError("the pooled embedding and time ids do not fit in one text token")
        token = embeds.new_zeros(n, 1, width)
        token[:, 0, : self.pooled_dim] = pooled
        token[:, 0, self.pooled_dim : self.pooled_dim + 6] = self.time_ids.to(token)
        return torch.cat([embeds, token], dim=1)

    def hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if kwargs.get("added_cond_kwargs") is not None:
            return None
        if len(args) > 2:
            packed, args = args[2], args[:2] + args[3:]
        else:
            packed = kwargs.pop("encoder_hidden_states")
        extra = packed[:, -1]
        kwargs["encoder_hidden_states"] = packed[:, :-1]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": extra[:, : self.pooled_dim],
            "time_ids": extra[:, self.pooled_dim : self.pooled_dim + 6],
        }
        return args, kwargs


def build_encoder(
    pipe: SDPipeline,
    device: torch.device,
    resolution: int,
    unets: Sequence[UNet2DConditionModel | None],
) -> Callable[[list[str]], torch.Tensor]:
    """captions -> the text conditioning every network of a stage is called with.

    For SDXL the pooled embedding and size ids are packed into one extra token
    (``PackedConditioning``) and each of ``unets`` gets the hook that unpacks them.
    """
    if isinstance(pipe, StableDiffusionXLPipeline):
        encoder_2 = pipe.text_encoder_2
        assert encoder_2 is not None
        packer = PackedConditioning(int(encoder_2.config.projection_dim), resolution)
        for unet in unets:
            if unet is not None:
                unet.register_forward_pre_hook(packer.hook, with_kwargs=True)
        xl_pipe = pipe

        def encode_xl(captions: list[str]) -> torch.Tensor:
            embeds, _, pooled, _ = xl_pipe.encode_prompt(
                captions,  # type: ignore[arg-type]  # annotated str, takes a list too
                device=device,
                do_classifier_free_guidance=False,
            )
            assert pooled is not None
            return packer.pack(embeds, pooled)

        return encode_xl
    sd_pipe = pipe

    def encode(captions: list[str]) -> torch.Tensor:
        embeds, _ = sd_pipe.encode_prompt(captions, device, 1, False)
        return embeds

    return encode
