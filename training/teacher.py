"""The teacher: the base pipeline every stage starts from, and its text conditioning.

``load_teacher`` reads a diffusers folder (SD1.5 or SDXL) or a registry model (its LoRAs fused).
``build_encoder`` turns captions into the one tensor every network of a stage is called with,
``unet(x, t, encoder_hidden_states)``: SD1.5's text embeddings as they are, SDXL's with the
pooled embedding and each sample's size and crop ids packed into one extra token
(``PackedConditioning``), and gives the guidance's unconditional input as SDXL's pipeline makes
it (zeros, ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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


MICRO_CONDITIONS = 6  # SDXL's time ids: original (h, w), crop top-left (top, left), target (h, w)


def micro_conditions(
    original_sizes: Sequence[tuple[int, int]],
    crops_top_left: Sequence[tuple[int, int]],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL's time ids ``(N, 6)`` per sample, as ``StableDiffusionXLPipeline._get_add_time_ids``
    builds them: ``original_size + crops_coords_top_left + target_size``, each ``(h, w)`` /
    ``(top, left)``.

    Args:
        original_sizes: each image's size before resizing and cropping, ``(height, width)``.
        crops_top_left: each crop's top-left corner in the resized image, ``(top, left)``.
        target_size: the training images' (the bucket's) ``(height, width)``.
    """
    if len(original_sizes) != len(crops_top_left):
        raise ValueError("one original size and one crop per sample")
    rows = [
        [*size, *crop, *target_size]
        for size, crop in zip(original_sizes, crops_top_left, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), MICRO_CONDITIONS)


@dataclass
class TextEmbeddings:
    """The text encoders' outputs for N captions: hidden states ``(N, L, D)``, and for SDXL the
    second encoder's pooled projection ``(N, P)`` (what ``encode_prompt`` returns)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


class PackedConditioning:
    """SDXL's added conditioning (pooled text embedding, size/crop ids) as one extra text token.

    The objectives call every network as ``unet(x, t, encoder_hidden_states)``; for an SDXL
    UNet the pooled embedding and time ids ride along as the last token of the hidden states,
    through every concatenation (guided teacher, discriminator), and a forward pre-hook unpacks
    them into ``added_cond_kwargs`` (calls that pass ``added_cond_kwargs``, like the pipeline's,
    are left alone).
    """

    def __init__(self, pooled_dim: int) -> None:
        self.pooled_dim = pooled_dim

    def pack(
        self, embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        """``embeds`` ``(N, L, D)`` with one more token holding ``pooled`` ``(N, P)`` and
        ``time_ids`` ``(N, 6)``: ``(N, L + 1, D)``."""
        n, _, width = embeds.shape
        if self.pooled_dim + MICRO_CONDITIONS > width:
            raise ValueError("the pooled embedding and time ids do not fit in one text token")
        token = embeds.new_zeros(n, 1, width)
        token[:, 0, : self.pooled_dim] = pooled
        token[:, 0, self.pooled_dim : self.pooled_dim + MICRO_CONDITIONS] = time_ids.to(token)
        return torch.cat([embeds, token], dim=1)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``pack``'s inverse: the hidden states and the UNet's ``added_cond_kwargs``."""
        extra = packed[:, -1]
        return packed[:, :-1], {
            "text_embeds": extra[:, : self.pooled_dim],
            "time_ids": extra[:, self.pooled_dim : self.pooled_dim + MICRO_CONDITIONS],
        }

    def hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if kwargs.get("added_cond_kwargs") is not None:
            return None
        if len(args) > 2:
            packed, args = args[2], args[:2] + args[3:]
        else:
            packed = kwargs.pop("encoder_hidden_states")
        kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"] = self.unpack(packed)
        return args, kwargs


class TextEncoder:
    """Captions (and, for SDXL, each sample's size and crop) -> the conditioning tensor every
    network of a stage is called with, ``unet(x, t, encoder_hidden_states)``.

    SD1.5: the text embeddings as they are. SDXL: the embeddings with the pooled embedding and
    time ids packed into one extra token (``PackedConditioning``). ``micro_conditions`` is
    ``(N, 6)`` (``micro_conditions()``); None means what the pipeline uses for generated images
    of the training resolution: ``(res, res, 0, 0, res, res)``.

    Args:
        pipe: the teacher pipeline, its text encoders on ``device``.
        device: where the conditioning is made.
        resolution: the default target (and original) size of SDXL's time ids.
        packer: SDXL's packing; None for SD1.5.
    """

    def __init__(
        self,
        pipe: SDPipeline,
        device: torch.device,
        resolution: int,
        packer: PackedConditioning | None,
    ) -> None:
        self.pipe, self.device, self.packer = pipe, device, packer
        self.default_time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32
        )
        # SDXL's pipeline uses zeros (hidden states and pooled) for an absent negative prompt
        # when its config says so (force_zeros_for_empty_prompt, true for SDXL base)
        self.zero_unconditional = packer is not None and bool(
            pipe.config.get("force_zeros_for_empty_prompt", False)
        )
        self._empty: TextEmbeddings | None = None

    def embed(self, captions: list[str]) -> TextEmbeddings:
        """The text encoders' outputs (``encode_prompt``, no guidance) for ``captions``."""
        if isinstance(self.pipe, StableDiffusionXLPipeline):
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions,  # type: ignore[arg-type]  # annotated str, takes a list too
                device=self.device,
                do_classifier_free_guidance=False,
            )
            assert pooled is not None
            return TextEmbeddings(embeds, pooled)
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return TextEmbeddings(embeds)

    def condition(
        self, embeddings: TextEmbeddings, micro_conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The networks' conditioning from ``embed``'s outputs (e.g. pre-encoded ones)."""
        hidden = embeddings.hidden.to(self.device)
        if self.packer is None:
            return hidden
        if embeddings.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding")
        time_ids = self.default_time_ids if micro_conditions is None else micro_conditions
        time_ids = time_ids.to(self.device).expand(hidden.shape[0], MICRO_CONDITIONS)
        return self.packer.pack(hidden, embeddings.pooled.to(self.device), time_ids)

    def __call__(
        self, captions: list[str], micro_conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The conditioning of ``captions`` (and their samples' ``micro_conditions``)."""
        return self.condition(self.embed(captions), micro_conditions)

    def unconditional(self, micro_conditions: torch.Tensor | None = None) -> torch.Tensor:
        """The guidance's unconditional input, ``(1, ...)`` or one per row of
        ``micro_conditions``: the encoded "" (SD1.5), zeros with the samples' time ids (SDXL
        with ``force_zeros_for_empty_prompt``: its pipeline's negative for no negative prompt)."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.embed([""])
        empty = self._empty
        if self.zero_unconditional:
            pooled = None if empty.pooled is None else torch.zeros_like(empty.pooled)
            empty = TextEmbeddings(torch.zeros_like(empty.hidden), pooled)
        if self.packer is not None and micro_conditions is not None:
            n = micro_conditions.shape[0]
            pooled = None if empty.pooled is None else empty.pooled.expand(n, -1)
            empty = TextEmbeddings(empty.hidden.expand(n, -1, -1), pooled)
        return self.condition(empty, micro_conditions)


def build_encoder(
    pipe: SDPipeline,
    device: torch.device,
    resolution: int,
    unets: Sequence[UNet2DConditionModel | None],
) -> TextEncoder:
    """The stage's ``TextEncoder``; for SDXL each of ``unets`` gets the hook that unpacks the
    packed conditioning token (``PackedConditioning``)."""
    packer = None
    if isinstance(pipe, StableDiffusionXLPipeline):
        encoder_2 = pipe.text_encoder_2
        assert encoder_2 is not None
        packer = PackedConditioning(int(encoder_2.config.projection_dim))
        for unet in unets:
            if unet is not None:
                unet.register_forward_pre_hook(packer.hook, with_kwargs=True)
    return TextEncoder(pipe, device, resolution, packer)
