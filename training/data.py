"""Training data: where a stage's images, captions and prompts come from.

Distillation (TSCD, LCM) trains on VAE latents of (RGB image, caption) pairs, centre-cropped to
``resolution`` and encoded once (``load_data``, cached under ``out_dir/data/``). The sources:
``data=shapes`` renders the Shapes world, ``data=folder`` reads ``<stem>.png|jpg|webp`` +
``<stem>.txt`` pairs from ``data_path``, ``data=webdataset`` the same pairs from ``.tar`` shards,
``data=parquet`` rows of ``image_column`` (encoded image bytes, or Hugging Face datasets'
``{bytes, path}`` struct) and ``caption_column`` from one ``.parquet`` file or a folder of them
(pyarrow, the ``training`` extra).

The feedback and DMD stages sample from the student instead: ``next_batch`` gives each step its
prompts, rendered Shapes scenes (with their latents and true masks, for the structure loss) or
lines of a prompts file.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hypersd.lora import SDPipeline
from hypersd.shapes import ShapesDataset
from training.segmentation import masks_tensor

if TYPE_CHECKING:  # the stages' configs, whose modules import this one
    from training.distill import DistillConfig
    from training.enhance import EnhanceConfig

DataSource = Literal["shapes", "folder", "webdataset", "parquet"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# ---------------------------------------------------------------------------------------------
# distillation: (image, caption) pairs, encoded to latents once


def shapes_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=shapes``: ``train_images`` renders of the Shapes world, resized to ``resolution``."""
    dataset = ShapesDataset(cfg.seed, cfg.train_images)
    images = np.empty((len(dataset), 64, 64, 3), dtype=np.uint8)
    captions = []
    for i, sample in enumerate(tqdm(dataset, desc="render", mininterval=5)):
        images[i] = sample.rendered.image
        captions.append(sample.caption)
    if cfg.resolution != 64:
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(im).resize((cfg.resolution,) * 2, Image.Resampling.BICUBIC)
                )
                for im in images
            ]
        )
    return images, captions


def square_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``resolution``: (H, W, 3) uint8."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((resolution,) * 2, Image.Resampling.BICUBIC))


def folder_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=folder``: every ``<stem>.png|jpg|webp`` with a ``<stem>.txt`` caption beside it."""
    if cfg.data_path is None:
        raise ValueError("data=folder needs data_path=<folder of <stem>.png + <stem>.txt>")
    folder = Path(cfg.data_path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if p.with_suffix(".txt").exists()]
    if not files:
        raise ValueError(f"no <stem>.png|jpg|webp + <stem>.txt pairs in {folder}")
    images = [square_crop(Image.open(path), cfg.resolution) for path in files]
    captions = [path.with_suffix(".txt").read_text().strip() for path in files]
    return np.stack(images), captions


def source_files(cfg: DistillConfig, suffix: str) -> tuple[Path, list[Path]]:
    """``data_path`` and its files: the file itself, or the folder's ``*<suffix>`` files."""
    if cfg.data_path is None:
        raise ValueError(f"data={cfg.data} needs data_path=<a {suffix} file or a folder of them>")
    source = Path(cfg.data_path)
    return source, sorted(source.glob(f"*{suffix}")) if source.is_dir() else [source]


def webdataset_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=webdataset``: ``.tar`` shards (one file, or a folder of them) holding
    ``<key>.jpg|png|webp`` + ``<key>.txt`` members, read with the standard library."""
    source, shards = source_files(cfg, ".tar")
    images, captions = [], []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                file = tar.extractfile(member) if member.isfile() else None
                if file is None:
                    continue
                # webdataset's rule: the key is the path up to the first dot of the file name
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                key = f"{folder}/{stem}"
                members.setdefault(key, {})[f".{suffix.lower()}"] = file.read()
        for key in sorted(members):
            sample = members[key]
            image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
            if image is None or ".txt" not in sample:
                continue
            images.append(square_crop(Image.open(io.BytesIO(image)), cfg.resolution))
            captions.append(sample[".txt"].decode().strip())
    if not images:
        raise ValueError(f"no <key>.jpg|png|webp + <key>.txt samples in {source}")
    return np.stack(images), captions


def parquet_pairs(cfg: DistillConfig) -> tuple[np.ndarray, list[str]]:
    """``data=parquet``: one ``.parquet`` file or a folder of them, a batch of rows at a time.

    ``image_column`` holds encoded images: bytes, or a struct with a ``bytes`` field (Hugging
    Face datasets' Image feature); rows without image bytes or caption are skipped.
    """
    # imported here: pyarrow is the training extra's, only this source needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, files = source_files(cfg, ".parquet")
    images, captions = [], []
    for file in files:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        for key, column in (
            ("image_column", cfg.image_column),
            ("caption_column", cfg.caption_column),
        ):
            if column not in schema.names:
                raise ValueError(
                    f"{file} has no column {column!r} ({key}); its columns: "
                    + ", ".join(schema.names)
                )
        kind = schema.field(cfg.image_column).type
        if not (
            pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
            or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)
        ):
            raise ValueError(
                f"{file}: image_column {cfg.image_column!r} is {kind}, not image bytes "
                "or a struct with a bytes field"
            )
        # batches, so that a large file is never read whole
        for batch in parquet.iter_batches(
            batch_size=256, columns=list(dict.fromkeys([cfg.image_column, cfg.caption_column]))
        ):
            rows = zip(
                batch.column(cfg.image_column).to_pylist(),
                batch.column(cfg.caption_column).to_pylist(),
                strict=True,
            )
            for image, caption in rows:
                data = image.get("bytes") if isinstance(image, dict) else image
                if data is None or caption is None:
                    continue
                images.append(square_crop(Image.open(io.BytesIO(data)), cfg.resolution))
                captions.append(str(caption).strip())
    if not images:
        raise ValueError(f"no rows with image bytes and a caption in {source}")
    return np.stack(images), captions


# ``DistillConfig.data`` -> its source
SOURCES: dict[DataSource, Callable[[DistillConfig], tuple[np.ndarray, list[str]]]] = {
    "shapes": shapes_pairs,
    "folder": folder_pairs,
    "webdataset": webdataset_pairs,
    "parquet": parquet_pairs,
}


def load_data(
    cfg: DistillConfig, pipe: SDPipeline, device: torch.device, write_cache: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents ``(N, C, h, w)`` and their captions, encoded once and cached.

    The cache's name hashes the data settings and the VAE's scaling factor, so a changed source
    is encoded again. Under a launcher every process encodes a missing cache itself (no process
    waits out another's encoding at a barrier, which may time out) and only the main one writes
    it (``write_cache``).
    """
    settings: list[Any] = [
        cfg.data,
        cfg.data_path,
        cfg.train_images,
        cfg.resolution,
        cfg.seed,
        cfg.teacher,
    ]
    if cfg.data == "parquet":
        # only here: the other sources' cache names (and so running jobs' caches) stay as they were
        settings += [cfg.image_column, cfg.caption_column]
    digest = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
    path = Path(cfg.out_dir) / "data" / f"latents-{digest}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        captions = json.loads(path.with_suffix(".json").read_text())
        return cached["latents"], captions
    images, captions = SOURCES[cfg.data](cfg)
    vae = pipe.vae
    scale = float(vae.config["scaling_factor"])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    chunks = []
    with torch.no_grad():
        for batch in tqdm(pixels.split(64), desc="encode", mininterval=5):
            posterior = vae.encode(batch.to(device, vae.dtype)).latent_dist
            chunks.append((posterior.mean * scale).float().cpu())
    latents = torch.cat(chunks).contiguous()
    if write_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(captions))
        # the latents last and renamed into place: their presence means a complete cache
        partial = path.with_suffix(".partial")
        save_file({"latents": latents}, str(partial))
        partial.replace(path)
    return latents, captions


# ---------------------------------------------------------------------------------------------
# feedback and DMD: each step's prompts


@dataclass
class Batch:
    """One step's prompts; for Shapes also their renders' latents and true instance masks."""

    captions: list[str]
    latent_shape: tuple[int, ...]
    render_latents: torch.Tensor | None = None
    masks: torch.Tensor | None = None


def next_batch(cfg: EnhanceConfig, step: int, vae: AutoencoderKL, device: torch.device) -> Batch:
    """Step ``step``'s batch: Shapes scenes (rendered), or lines of the ``prompts`` file."""
    if cfg.prompts is not None:
        lines = [line.strip() for line in Path(cfg.prompts).read_text().splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"no prompts in {cfg.prompts}")
        start = step * cfg.batch_size
        captions = [lines[(start + i) % len(lines)] for i in range(cfg.batch_size)]
        factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        side = cfg.resolution // factor
        shape = (cfg.batch_size, int(vae.config["latent_channels"]), side, side)
        return Batch(captions, shape)
    dataset = ShapesDataset(cfg.seed + 7, 10**9)
    samples = [dataset[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
    pixels = torch.from_numpy(np.stack([s.rendered.image for s in samples]))
    pixels = pixels.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * float(vae.config["scaling_factor"])
    masks = masks_tensor([s.rendered for s in samples], device)
    return Batch([s.caption for s in samples], tuple(latents.shape), latents, masks)
