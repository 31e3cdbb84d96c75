"""Image operations of the small Shapes networks: images as tensors, and their degradations.

``augment`` imitates what a generative model or an autoencoder does to an image
(blur, noise, slight colour drift, JPEG and resampling softness); the attribute
and segmentation networks train on it, the aesthetic model's degradations
(``training.aesthetic``) build on its blur and JPEG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hypersd.shapes.spec import CANVAS


def images_to_tensor(
    images: Sequence[Image.Image | np.ndarray] | np.ndarray | Tensor,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N, 3, 64, 64) float tensor in [0, 1] from PIL images or uint8 (N, H, W, 3) arrays.

    Images of another size (a 512 px SD output) are box-filtered to 64 px, the
    Shapes canvas, so any pipeline can be judged. A tensor is passed through
    unchanged (it must already be (N, 3, 64, 64) in [0, 1]).
    """
    if isinstance(images, Tensor):
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("a tensor must already be float (N, 3, H, W) in [0, 1]")
        return images.to(device)
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            if image.dtype != np.uint8:
                raise ValueError(f"arrays must be uint8 (H, W, 3), got {image.dtype}")
            if image.shape[:2] == (CANVAS, CANVAS):
                arrays.append(np.asarray(image))
                continue
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (CANVAS, CANVAS):
            image = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
        arrays.append(np.asarray(image))
    if not arrays:
        return torch.zeros(0, 3, CANVAS, CANVAS, device=device)
    batch = torch.from_numpy(np.stack(arrays)).to(device)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class AugmentConfig:
    """How far an image may drift from a clean render and still count as the same scene.

    The palette's closest pair (red / orange) is ~105 RGB units apart, so the
    colour drift (gain + shift, ~20 units at most) stays well inside half of it.
    """

    prob: float = 0.8  # share of the batch augmented at all
    blur_prob: float = 0.5
    blur_sigma_max: float = 1.0
    soften_prob: float = 0.25  # downsample + upsample, like a VAE's soft edges
    soften_min_size: int = 32
    jpeg_prob: float = 0.2
    jpeg_quality_min: int = 30
    color_gain: float = 0.05
    color_shift: float = 0.03
    noise_prob: float = 0.5
    noise_std_max: float = 0.04


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Per-image separable gaussian blur of (N, C, H, W) images; ``sigma`` (N,) in pixels.

    A sigma of 0 leaves an image as it is; ``radius`` bounds the kernel (3 suits sigma <= 1.5).
    """
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
        kernel[:, None, None, :],
        groups=n * c,
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="replicate"),
        kernel[:, None, :, None],
        groups=n * c,
    )
    return flat.reshape(n, c, h, w)


def jpeg_roundtrip(image: Tensor, quality: int) -> Tensor:
    """One (3, H, W) image in [0, 1] through JPEG at ``quality`` and back."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float().div(255).to(image.device)


def augment(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """A randomly degraded copy of a (N, 3, H, W) [0, 1] batch (on the batch's device).

    Randomness comes from ``generator`` (a CPU generator) so that evaluation
    on augmented renders is reproducible.
    """
    n = images.shape[0]
    device = images.device

    def draw(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    active = draw(n) < config.prob
    out = images.clone()
    # colour drift: per-image per-channel gain and shift
    gain = 1 + (draw(n, 3) * 2 - 1) * config.color_gain
    shift = (draw(n, 3) * 2 - 1) * config.color_shift
    drifted = out * gain[:, :, None, None] + shift[:, :, None, None]
    out = torch.where(active[:, None, None, None], drifted, out)
    # blur
    sigma = draw(n) * config.blur_sigma_max
    blur = active & (draw(n) < config.blur_prob)
    if blur.any():
        out[blur] = gaussian_blur(out[blur], sigma[blur])
    # soft resampling
    soften = active & (draw(n) < config.soften_prob)
    if soften.any():
        size = config.soften_min_size + int(
            draw(1).item() * (images.shape[-1] - config.soften_min_size)
        )
        small = F.interpolate(out[soften], size=(size, size), mode="bilinear", antialias=True)
        out[soften] = F.interpolate(small, size=images.shape[-2:], mode="bilinear")
    # JPEG
    jpeg = active & (draw(n) < config.jpeg_prob)
    qualities = config.jpeg_quality_min + (draw(n) * (95 - config.jpeg_quality_min)).long()
    for i in torch.nonzero(jpeg).flatten().tolist():
        out[i] = jpeg_roundtrip(out[i], int(qualities[i]))
    # noise
    noisy = active & (draw(n) < config.noise_prob)
    std = draw(n) * config.noise_std_max * noisy
    noise = torch.randn(images.shape, generator=generator).to(device)
    out = out + noise * std[:, None, None, None]
    return out.clamp(0, 1)
