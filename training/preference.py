"""CLIP preference rewards (PickScore, HPS v2) and the CLIP score, from a local CLIP folder.

PickScore (Kirstain et al. 2023) and HPS v2 (Wu et al. 2023) are CLIP ViT-H/14 models fine-tuned
on human preferences; both score an image against its prompt as ``logit_scale · cos(image, text)``
(PickScore's published usage: ``model.logit_scale.exp() * text_embs @ image_embs.T``). Any such
model saved as a ``transformers`` ``CLIPModel`` folder (``model.safetensors``, ``config.json``
and its tokenizer, e.g. ``yuvalkirstain/PickScore_v1``) loads here; nothing is downloaded.

The CLIP score of evaluations (Hessel et al. 2021, torchmetrics' ``CLIPScore``) is
``100 · max(cos, 0)`` with a plain CLIP (openai/clip-vit-large-patch14): ``ClipPreference.
clip_score``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.imagereward import clip_pixels


class ClipPreference(nn.Module):
    """A CLIP model scoring images against captions; ``forward`` is the preference reward.

    Args:
        clip: a ``transformers`` ``CLIPModel``.
        tokenizer: its tokenizer.
    """

    def __init__(self, clip: Any, tokenizer: Any) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = int(clip.config.vision_config.image_size)
        # CLIP's text length (77); the tokenizer's own limit may be unset
        self.max_tokens = int(clip.config.text_config.max_position_embeddings)

    def cosine(self, images: Tensor, captions: Sequence[Any]) -> Tensor:
        """(N,) cosine similarity of each ``(N, 3, H, W)`` [0, 1] image and its caption."""
        tokens = self.tokenizer(
            [str(caption) for caption in captions],
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(images.device)
        pixels = clip_pixels(images, self.image_size).to(self.clip.logit_scale.dtype)
        image = self.clip.get_image_features(pixel_values=pixels)
        text = self.clip.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        )
        image, text = _embeds(image), _embeds(text)
        return torch.cosine_similarity(image.float(), text.float(), dim=-1)

    def forward(self, images: Tensor, captions: Sequence[Any]) -> Tensor:
        """(N,) preference rewards ``logit_scale.exp() · cos``; differentiable in the images."""
        return self.clip.logit_scale.exp().float() * self.cosine(images, captions)

    def clip_score(self, images: Tensor, captions: Sequence[Any]) -> Tensor:
        """(N,) CLIP scores ``100 · max(cos, 0)`` (torchmetrics' definition)."""
        return 100 * self.cosine(images, captions).clamp(min=0)


def _embeds(output: Any) -> Tensor:
    """The projected embeddings (transformers 5 may return a model output, 4 a tensor)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def load_clip_preference(folder: str | Path, device: torch.device | str = "cpu") -> ClipPreference:
    """A local ``CLIPModel`` folder (safetensors) and its tokenizer, frozen, in eval mode."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ClipPreference(clip, tokenizer).requires_grad_(False).eval().to(device)
