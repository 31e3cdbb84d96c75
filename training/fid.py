"""FID of generated images against a reference image folder, with local feature weights only.

The features are a CLIP vision tower's pooled output (a local ``transformers`` folder: a
``CLIPModel`` or ``CLIPVisionModel`` one, safetensors), i.e. FID_CLIP (Kynkäänniemi et al.
2023, clean-fid's ``clip_vit_b_32`` mode), which tracks human judgement better than Inception's
features on modern generators. The Fréchet distance itself is ``training.evaluate.
frechet_distance`` (the Shapes FID's). Numbers compare only between runs with the same feature
weights and reference folder, never with published Inception FIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from training.evaluate import frechet_distance
from training.imagereward import clip_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: str | Path) -> list[Path]:
    """The images of ``folder`` (png, jpg, jpeg, webp), sorted by name.

    Raises ``ValueError`` when it holds fewer than two (a covariance needs two).
    """
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least two images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as a ``(3, H, W)`` float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


class ClipFeatures:
    """Pooled CLIP vision features of images (the FID feature space).

    Args:
        folder: a local CLIP folder (safetensors); its vision tower is used.
        device: where to run it.
    """

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPVisionModel

        model: Any = CLIPVisionModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True
        )
        self.model = model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        self.size = int(model.config.image_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """``(N, D)`` float64 features of the PIL images (any sizes)."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.cat(
                [
                    clip_pixels(to_tensor(image)[None].to(self.device), self.size)
                    for image in images[start : start + batch_size]
                ]
            )
            out.append(self.model(pixel_values=pixels).pooler_output.double().cpu().numpy())
        return np.concatenate(out)


def folder_features(features: ClipFeatures, folder: str | Path) -> np.ndarray:
    """Features of every image in ``folder`` (``image_files``)."""
    images = []
    for path in image_files(folder):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return features(images)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between two ``(N, D)`` feature sets (0 for identical sets)."""
    return frechet_distance(features_a, features_b)
