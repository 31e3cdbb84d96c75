"""Where the evaluated images come from: a registry model, a diffusers pipeline folder, or
renders passed through an autoencoder (``hypersd-train evaluate``'s image sources).

Each generated image has its own seed (``seed + index``), so what is measured does not
depend on the batch size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from training.devices import resolve_device
from training.image_ops import images_to_tensor

# How a pipeline folder samples: DDIM with trailing spacing (the Hyper-SD N-step recipe),
# plain DDIM, or the folder's own scheduler.
PipelineScheduler = Literal["ddim-trailing", "ddim", "model"]


def generate_with_registry(
    model: str | None,
    captions: Sequence[str],
    *,
    seed: int,
    steps: int | None,
    guidance: float | None,
    eta: float | None,
    size: int | None,
    batch_size: int,
    device: str | None,
    registry_path: str | None = None,
) -> tuple[list[Image.Image], str]:
    """Images from a registry model through the serving pipeline (what users get)."""
    from hypersd.pipeline import ImageRequest, load
    from hypersd.registry import load_registry

    registry = load_registry(registry_path)
    name = model or registry.default
    # Eager, whatever backend the registry serves it with: evaluations compare trained models
    # across runs and machines, and a compiled backend would add a build and its own rounding
    # (tests/test_shipped_models.py bounds the served backend's images against eager's).
    spec = registry.get(name).model_copy(update={"backend": "eager"})
    generator = load(spec, device=device, warmup=False)
    images: list[Image.Image] = []
    for start in _progress(range(0, len(captions), batch_size), "generate"):
        requests = [
            ImageRequest(prompt=c, seed=seed + start + i)
            for i, c in enumerate(captions[start : start + batch_size])
        ]
        result = generator.generate(
            requests, steps=steps, width=size, height=size, guidance_scale=guidance, eta=eta
        )
        images.extend(result.images)
    return images, name


def generate_with_pipeline_dir(
    directory: str,
    captions: Sequence[str],
    *,
    scheduler: PipelineScheduler,
    seed: int,
    steps: int | None,
    guidance: float | None,
    eta: float | None,
    size: int | None,
    batch_size: int,
    device: str | None,
) -> list[Image.Image]:
    """Images from a diffusers StableDiffusionPipeline folder (safetensors only).

    ``scheduler``: ``ddim-trailing`` (the Hyper-SD N-step recipe), ``ddim`` or
    ``model`` (the folder's own). Each image has its own CPU generator seeded
    ``seed + index``, so results do not depend on the batch size or device.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        directory, use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    if scheduler == "ddim-trailing":
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing"
        )
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "model":
        raise ValueError(f"scheduler must be ddim-trailing, ddim or model, got {scheduler!r}")
    pipe.to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    options: dict[str, Any] = {"output_type": "pil"}
    if steps is not None:
        options["num_inference_steps"] = steps
    if guidance is not None:
        options["guidance_scale"] = guidance
    if eta is not None:
        options["eta"] = eta
    if size is not None:
        options["height"] = options["width"] = size
    images: list[Image.Image] = []
    for start in _progress(range(0, len(captions), batch_size), "generate"):
        prompts = list(captions[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(prompts))]
        with torch.no_grad():
            images.extend(pipe(prompts, generator=generators, **options).images)
    return images


@torch.no_grad()
def reconstruct(
    images: Sequence[np.ndarray], vae_path: str, *, batch_size: int, device: str | None
) -> list[np.ndarray]:
    """Round trip through an AutoencoderKL (encode -> latent mode -> decode), as uint8 images.

    ``vae_path`` is a VAE folder or a pipeline folder with a ``vae/`` subfolder.
    """
    from diffusers import AutoencoderKL

    path = Path(vae_path)
    subfolder = "vae" if (path / "vae" / "config.json").exists() else None
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, use_safetensors=True)
    vae = vae.to(resolve_device(device)).eval()
    out: list[np.ndarray] = []
    for start in _progress(range(0, len(images), batch_size), "reconstruct"):
        x = images_to_tensor(images[start : start + batch_size], vae.device) * 2 - 1
        latents = vae.encode(x).latent_dist.mode()
        decoded = ((vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round()
        out.extend(decoded.byte().permute(0, 2, 3, 1).cpu().numpy())
    return out


def _progress(items: Sequence[int], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr)
