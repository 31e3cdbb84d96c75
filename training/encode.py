"""``hypersd-train encode``: pre-encode a data source into latent + text-embedding shards, once.

Every distillation stage and process can then read ``data=encoded data_path=<out_dir>`` instead
of decoding images and running the VAE and text encoders at every step. The source, buckets and
crops are the same settings as a stage's (``training.data``); the teacher gives the VAE and text
encoders (so the shards belong to that teacher's family and ``resolution``).

``out_dir`` holds, per shard of up to ``shard_size`` samples of one bucket:
  - ``<h>x<w>-<n>.safetensors``: ``latents`` ``(N, C, h/8, w/8)`` (scaled VAE posterior means),
    ``prompt_embeds`` ``(N, L, D)`` and for SDXL ``pooled_prompt_embeds`` ``(N, P)``, float16;
  - ``<h>x<w>-<n>.json``: ``captions``, ``original_sizes`` ``[h, w]``, ``crops_top_left``
    ``[top, left]`` per sample (SDXL's time ids);
and ``meta.json``: the settings, ``complete`` once every process has finished.

Resumable: a rerun with the same settings skips every shard already written (the source is
read again, but only missing shards are encoded). A shard is written atomically: its sidecar
first, then the tensors to ``.partial``, renamed into place, so a ``.safetensors`` file is always
complete. Under ``accelerate launch`` each process encodes its share of the source into its own
shards (``p<rank>of<world>-...``; resume with the same number of processes).

    hypersd-train encode --config training/configs/sdxl-encode.yaml
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from safetensors.torch import save_file
from tqdm import tqdm

from hypersd.shapes import ShapesDataset
from training.config import config_to_dict, load_config
from training.data import (
    Crop,
    DataSource,
    ImageSample,
    bucket_batches,
    bucket_key,
    encode_pixels,
    image_batch,
    shapes_pixels,
    stream_samples,
)
from training.data_sources import ENCODED_META
from training.devices import to_device
from training.distributed import make_accelerator
from training.teacher import TextEncoder, build_encoder, load_teacher


@dataclass(frozen=True)
class EncodeConfig:
    """The settings of ``hypersd-train encode`` (the data fields as in ``DistillConfig``)."""

    teacher: str = "models/shapes-base"  # a diffusers folder, or a registry model name
    registry: str | None = None
    out_dir: str = "data/encoded"  # the shards' folder: a stage's data_path with data=encoded
    seed: int = 0  # the random crops' and the units' order
    device: str = "auto"
    threads: int = 0
    # the source, as a stage's: shapes | folder | webdataset | parquet (training.data)
    data: DataSource = "folder"
    data_path: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    train_images: int = 20_000  # data=shapes
    resolution: int = 64
    bucket_step: int = 64
    bucket_max_ratio: float = 2.0
    crop: Crop = "center"
    shard_size: int = 256  # samples per shard (one bucket)
    batch_size: int = 16  # images per VAE / text-encoder call


def shapes_samples(cfg: EncodeConfig, rank: int, world: int) -> Iterator[ImageSample]:
    """``data=shapes``: process ``rank``'s renders (every ``world``-th), in order."""
    dataset = ShapesDataset(cfg.seed, cfg.train_images)
    for i in range(rank, len(dataset), world):
        pixels = shapes_pixels(dataset, [i], cfg.resolution)[0]
        yield ImageSample(pixels, dataset[i].caption, (64, 64), (0, 0))


def write_shard(
    path: Path,
    samples: list[ImageSample],
    encoder: TextEncoder,
    vae: AutoencoderKL,
    device: torch.device,
    batch_size: int,
) -> None:
    """Encode one bucket's ``samples`` and write them as the shard ``path`` (atomically)."""
    latents, hidden, pooled = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = image_batch(samples[start : start + batch_size])
        assert batch.pixels is not None
        latents.append(encode_pixels(vae, batch.pixels, device).half().cpu())
        with torch.no_grad():
            text = encoder.embed(batch.captions)
        hidden.append(text.hidden.half().cpu())
        if text.pooled is not None:
            pooled.append(text.pooled.half().cpu())
    tensors = {"latents": torch.cat(latents), "prompt_embeds": torch.cat(hidden)}
    if pooled:
        tensors["pooled_prompt_embeds"] = torch.cat(pooled)
    sidecar = {
        "captions": [s.caption for s in samples],
        "original_sizes": [list(s.original_size) for s in samples],
        "crops_top_left": [list(s.crop_top_left) for s in samples],
    }
    # the sidecar first: a shard's .safetensors, renamed into place last, means it is complete
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(sidecar))
    partial.replace(path.with_suffix(".json"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.replace(path)


def check_meta(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder encoded with other settings (a resumed run must match its shards)."""
    meta = out / ENCODED_META
    if meta.exists():
        before = json.loads(meta.read_text())["settings"]
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{out} was encoded with other {', '.join(changed)}; use a new out_dir"
            )


def run(cfg: EncodeConfig) -> dict[str, int]:
    """Encode ``cfg``'s source into ``cfg.out_dir``; returns this process's shard and sample
    counts (``written``, ``skipped``, ``samples``)."""
    if cfg.data == "encoded":
        raise ValueError(
            "data=encoded: nothing to encode; allowed: shapes, folder, webdataset, parquet"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator, device = make_accelerator(cfg.device, "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out_dir)
    pipe = load_teacher(cfg.teacher, cfg.registry)
    # what the shards depend on (not where or how fast they were made)
    settings = {
        key: value
        for key, value in config_to_dict(cfg).items()
        if key not in ("device", "threads", "batch_size")
    } | {
        "processes": world,
        "family": "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15",
    }
    check_meta(out, settings)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / ENCODED_META).exists():
            (out / ENCODED_META).write_text(json.dumps({"settings": settings, "complete": False}))
    accelerator.wait_for_everyone()

    for component in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None:
            to_device(module.requires_grad_(False), device).eval()
    encoder = build_encoder(pipe, device, cfg.resolution, ())
    samples = (
        shapes_samples(cfg, rank, world)
        if cfg.data == "shapes"
        else stream_samples(cfg, rank, world, cfg.seed, epochs=1)
    )
    prefix = f"p{rank}of{world}-" if world > 1 else ""
    counts = {"written": 0, "skipped": 0, "samples": 0}
    shards_per_bucket: dict[str, int] = {}
    groups = bucket_batches(samples, cfg.shard_size, bucket_key, keep_last=True)
    for group in tqdm(groups, desc="encode", unit="shard", disable=not accelerator.is_main_process):
        pixels = group[0].pixels
        assert isinstance(pixels, np.ndarray)
        bucket = f"{pixels.shape[0]}x{pixels.shape[1]}"
        index = shards_per_bucket.get(bucket, 0)
        shards_per_bucket[bucket] = index + 1
        path = out / f"{prefix}{bucket}-{index:06d}.safetensors"
        counts["samples"] += len(group)
        if path.exists():
            counts["skipped"] += 1
            continue
        write_shard(path, group, encoder, pipe.vae, device, cfg.batch_size)
        counts["written"] += 1
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = sorted(out.glob("*.safetensors"))
        meta = {"settings": settings, "complete": True, "shards": len(shards)}
        (out / ENCODED_META).write_text(json.dumps(meta, indent=2))
    return counts


def main(argv: list[str]) -> int:
    """``hypersd-train encode --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="hypersd-train encode", description=__doc__)
    parser.add_argument("--config", help="YAML file of EncodeConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(EncodeConfig, args.config, args.overrides)
    counts = run(cfg)
    print(
        f"{cfg.out_dir}: {counts['written']} shards written, {counts['skipped']} already there "
        f"({counts['samples']} samples in this process)"
    )
    return 0
