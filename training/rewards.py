"""Reward models for human-feedback learning, behind one loader.

Every reward is ``r(images, captions) -> (N,)``, differentiable in the images, with images
``(N, 3, H, W)`` in [0, 1] (``training.objectives.feedback.RewardFn``). The kinds:

- ``shapes-alignment``: the ImageReward analogue of the Shapes world, the attribute network's
  log-probability that the image shows its caption (0 for a certain match). The shipped one
  (``models/shapes-alignment``) is a second attribute network trained with another seed, so the
  evaluator (``models/shapes-attributes``) is not the network the model was tuned against.
- ``shapes-aesthetic``: the LAION-aesthetic analogue (``training.aesthetic``), ~1 for clean renders.
- ``laion-aesthetic``: the LAION aesthetic predictor for real models: a CLIP vision tower
  (a local ``transformers`` folder) and the predictor's MLP as ``.safetensors``, keys as in the
  original ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0.weight`` ...; convert that file once
  with ``safetensors.torch.save_file(torch.load(...))`` on a machine you trust).
- ``imagereward``: ImageReward (``training.imagereward``), from the folder that
  ``hypersd-train convert-imagereward`` writes once from the released ``ImageReward.pt``
  (safetensors only at training time). Scores are normalised (about -2 .. 2).
- ``pickscore``: a CLIP preference model, PickScore or HPS v2 saved as a ``transformers``
  ``CLIPModel`` folder (``training.preference``): ``logit_scale · cos(image, caption)``
  (PickScore: about 18-23).

A reward whose weights are missing is skipped with a printed reason, never silently.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from training.objectives.feedback import RewardFn

RewardKind = Literal[
    "shapes-alignment", "shapes-aesthetic", "laion-aesthetic", "imagereward", "pickscore"
]
REWARD_KINDS: tuple[RewardKind, ...] = typing.get_args(RewardKind)

# CLIP's image normalisation (openai/CLIP, transformers' CLIPImageProcessor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preference_mlp(width: int) -> nn.Sequential:
    """The score head of the LAION aesthetic predictor and of ImageReward: width -> 1.

    Both released checkpoints name its linear layers ``0, 2, 4, 6, 7`` (the dropouts between
    them have no weights), so their state dicts load into it as they are.

    Args:
        width: the embedding's width (CLIP's projection, or BLIP's text hidden size).
    """
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@dataclass(frozen=True)
class RewardSpec:
    """One reward term of the feedback loss.

    Args:
        kind: one of ``REWARD_KINDS``.
        path: its weights (a folder; for ``laion-aesthetic`` the CLIP folder, for
            ``imagereward`` the converted folder, for ``pickscore`` the CLIPModel folder).
        weight: the term's weight in the loss.
        margin: ReFL's α: an image whose reward reaches it costs nothing.
        head: ``laion-aesthetic`` only: the MLP's ``.safetensors`` file.
    """

    kind: str
    path: str
    weight: float = 1.0
    margin: float = 0.0
    head: str | None = None


class LaionAestheticReward(nn.Module):
    """The LAION aesthetic predictor: MLP over the L2-normalised CLIP image embedding.

    The layer indices match the original checkpoint (``layers.{0,2,4,6,7}``; the dropouts between
    them have no weights), so its converted state dict loads as it is.
    """

    def __init__(self, clip: Any, embed_dim: int) -> None:
        super().__init__()
        self.clip = clip
        self.layers = preference_mlp(embed_dim)
        size = int(
            clip.config.vision_config.image_size
            if hasattr(clip.config, "vision_config")
            else clip.config.image_size
        )
        self.image_size = size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, captions: Sequence[Any] | None = None) -> Tensor:
        """(N,) aesthetic scores (about 1-10) of ``(N, 3, H, W)`` [0, 1] images; keeps the graph."""
        pixels = F.interpolate(
            images.float(), size=(self.image_size,) * 2, mode="bicubic", align_corners=False
        )
        mean = pixels.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = pixels.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        embeds = self.clip(pixel_values=pixels).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.layers(embeds).squeeze(-1)


def load_laion_aesthetic(
    clip_path: str | Path, head_path: str | Path, device: torch.device
) -> LaionAestheticReward:
    """The LAION predictor from a local CLIP folder and the MLP's ``.safetensors``; frozen."""
    from transformers import CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection.from_pretrained(
        str(clip_path), local_files_only=True, use_safetensors=True
    )
    model = LaionAestheticReward(clip, int(clip.config.projection_dim))
    head = load_file(str(head_path))
    model.layers.load_state_dict({k.removeprefix("layers."): v for k, v in head.items()})
    return model.requires_grad_(False).eval().to(device)


def load_reward(spec: RewardSpec, device: torch.device) -> RewardFn | None:
    """The reward function of ``spec``, or None (with the reason printed) if it can't load here."""
    if spec.kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {', '.join(REWARD_KINDS)}, got {spec.kind!r}")
    path = Path(spec.path)
    if not path.exists():
        print(f"reward {spec.kind} skipped: no weights at {path}")
        return None
    if spec.kind == "shapes-alignment":
        from training.attributes import load_attribute_net

        return load_attribute_net(path, device).log_prob
    if spec.kind == "shapes-aesthetic":
        from training.aesthetic import load_aesthetic_model

        return load_aesthetic_model(path, device).reward
    if spec.kind == "imagereward":
        from training.imagereward import load_imagereward

        if not (path / "model.safetensors").exists():
            print(
                f"reward imagereward skipped: no model.safetensors in {path} (ImageReward.pt "
                "is a pickle: convert it once with hypersd-train convert-imagereward)"
            )
            return None
        return load_imagereward(path, device)
    if spec.kind == "pickscore":
        from training.preference import load_clip_preference

        return load_clip_preference(path, device)
    if spec.head is None or not Path(spec.head).exists():
        print(f"reward laion-aesthetic skipped: no MLP head .safetensors at {spec.head}")
        return None
    return load_laion_aesthetic(path, spec.head, device)
