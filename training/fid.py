"""FID of generated images against a reference image folder, with local feature weights only.

Two feature spaces:

* ``clip`` (the default): a CLIP vision tower's pooled output (a local ``transformers`` folder:
  a ``CLIPModel`` or ``CLIPVisionModel`` one, safetensors), i.e. FID_CLIP (Kynkäänniemi et al.
  2023, clean-fid's ``clip_vit_b_32`` mode), which tracks human judgement better than
  Inception's features on modern generators; its numbers compare only between runs with the
  same feature weights and reference folder.
* ``inception``: the 2048-d pool features of TensorFlow's Inception-v3 (``training.inception``,
  the weights pytorch-fid and torch-fidelity use, converted once by ``hypersd-train
  convert-inception``): the FID of published tables, given the same reference images and count.

The Fréchet distance is ``training.evaluate.frechet_distance`` (the Shapes FID's), or its
exact low-rank form when there are fewer images than feature dimensions (``fid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from training.evaluate import frechet_distance
from training.imagereward import clip_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FeatureSpace = Literal["clip", "inception"]


class Features(Protocol):
    """A feature extractor for FID: PIL images to ``(N, D)`` float64 features."""

    def __call__(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """``(N, D)`` features of ``images``, ``batch_size`` at a time."""
        ...


def load_features(
    space: FeatureSpace, path: str | Path, device: torch.device | str = "cpu"
) -> Features:
    """The feature extractor of ``space`` with its local weights.

    Args:
        space: ``clip`` (``path``: a CLIP folder) or ``inception`` (``path``: the safetensors
            file ``convert-inception`` wrote).
        path: the weights.
        device: where to run it.
    """
    if space == "clip":
        return ClipFeatures(path, device)
    if space == "inception":
        from training.inception import InceptionFeatures

        return InceptionFeatures(path, device)
    raise ValueError(f"FID features must be one of clip, inception; got {space!r}")


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


def folder_features(features: Features, folder: str | Path) -> np.ndarray:
    """Features of every image in ``folder`` (``image_files``)."""
    images = []
    for path in image_files(folder):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return features(images)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between two ``(N, D)`` feature sets (0 for identical sets).

    With fewer images than dimensions (a few prompts in 2048-d Inception space) the covariances
    have rank below D, and the trace term is computed exactly from the images: with
    ``S_a = A^T A`` and ``S_b = B^T B`` (A, B the centred features over sqrt(n - 1)), the
    non-zero eigenvalues of ``S_a S_b`` are the squared singular values of ``A B^T``, so
    ``Tr sqrt(S_a S_b)`` is its nuclear norm: an n_a x n_b problem instead of a D x D matrix
    square root (tens of seconds at D = 2048 on one core). Otherwise ``frechet_distance``.

    Args:
        features_a: ``(N_a, D)`` features.
        features_b: ``(N_b, D)`` features.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        # frechet_distance says what is wrong
        return frechet_distance(a, b)
    if len(a) * len(b) >= a.shape[1] ** 2:
        return frechet_distance(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a = (a - mu_a) / np.sqrt(len(a) - 1)
    centred_b = (b - mu_b) / np.sqrt(len(b) - 1)
    trace_a, trace_b = (centred_a**2).sum(), (centred_b**2).sum()
    cross = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    # rounding can leave identical sets a hair below zero
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * cross))
