"""Streaming training data (``training.data``): buckets, crops, per-process shares, laziness, and
Shapes batches equal to those of the former up-front encoding; distillation on tiny SD1.5 and
SDXL models from a webdataset folder, with aspect buckets and random crops."""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import tiny_image_captions, tiny_sd15_pipeline, write_webdataset

from hypersd.shapes import ShapesDataset
from training.data import (
    ImageSample,
    TrainingData,
    aspect_buckets,
    batch_latents,
    bucket_batches,
    fit_to_bucket,
    nearest_bucket,
    stream_samples,
)
from training.distill import DistillConfig, run

BUCKETS_64 = [(80, 48), (64, 64), (48, 80)]  # resolution 64, bucket_step 16, max ratio 2


def data_config(**overrides: Any) -> DistillConfig:
    values: dict[str, Any] = {"resolution": 64, "bucket_step": 16, "batch_size": 2}
    return DistillConfig(**(values | overrides))


def one_epoch(cfg: DistillConfig, rank: int = 0, world: int = 1) -> list[ImageSample]:
    samples = list(stream_samples(cfg, rank, world, seed=0, epochs=1))
    assert all(isinstance(s, ImageSample) for s in samples)
    return samples  # type: ignore[return-value]


def test_aspect_buckets() -> None:
    assert aspect_buckets(64, step=16) == BUCKETS_64
    for resolution in (512, 1024):
        buckets = aspect_buckets(resolution)
        assert (resolution, resolution) in buckets
        for h, w in buckets:
            assert h % 64 == 0 and w % 64 == 0
            assert max(h / w, w / h) <= 2
            assert abs(h * w / resolution**2 - 1) < 0.1  # ~resolution² pixels
        # landscape and portrait alike
        assert sorted(buckets) == sorted((w, h) for h, w in buckets)
    # SDXL's own buckets among them
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344)} <= set(aspect_buckets(1024))
    assert aspect_buckets(64, max_ratio=1) == [(64, 64)]
    with pytest.raises(ValueError, match="bucket_step"):
        aspect_buckets(100, step=64)
    # nearest by aspect ratio: (height, width)
    assert nearest_bucket((56, 96), BUCKETS_64) == (48, 80)
    assert nearest_bucket((100, 60), BUCKETS_64) == (80, 48)
    assert nearest_bucket((70, 72), BUCKETS_64) == (64, 64)


def gradient_image(width: int, height: int) -> Image.Image:
    """Red = column, green = row: a crop's position can be read off its pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


@pytest.mark.parametrize("crop", ["center", "random"])
def test_crops_record_their_corner_in_the_resized_image(crop: str) -> None:
    """The pixels are the window at the recorded corner of the image resized to cover the
    bucket (SDXL's ``crops_coords_top_left``); centre crops sit in the middle."""
    image = gradient_image(200, 100)  # 2:1 landscape into the 48x80 bucket
    bucket = (48, 80)
    scale = max(48 / 100, 80 / 200)
    covering = image.resize((round(200 * scale), round(100 * scale)), Image.Resampling.BICUBIC)
    corners = set()
    rng = random.Random(0)
    for _ in range(20):
        pixels, (top, left) = fit_to_bucket(image, bucket, crop, rng)  # type: ignore[arg-type]
        assert pixels.shape == (48, 80, 3)
        window = np.asarray(covering.crop((left, top, left + 80, top + 48)))
        assert np.abs(window.astype(int) - pixels.astype(int)).mean() < 3
        corners.add((top, left))
    if crop == "center":
        assert corners == {(0, 8)}  # the covering image is 48 x 96: 16 columns to spare
    else:
        assert len(corners) > 5 and all(t == 0 and 0 <= c <= 16 for t, c in corners)
    with pytest.raises(ValueError, match="allowed: center, random"):
        fit_to_bucket(image, bucket, "middle", rng)  # type: ignore[arg-type]


def test_bucketed_batches_and_their_time_ids(tmp_path: Path) -> None:
    """Every batch is one bucket; each row of its time ids is its sample's original size, crop
    and the bucket's size."""
    pairs = tiny_image_captions(12)
    sizes = {caption: (image.height, image.width) for image, caption in pairs}
    folder = write_webdataset(tmp_path / "wds", pairs, shards=2)
    cfg = data_config(data="webdataset", data_path=str(folder), crop="random")
    data = TrainingData(cfg, batch_size=2, rank=0, world=1, vae_factor=8)
    batches = data.batches(seed=0)
    seen = set()
    for _ in range(12):
        batch = next(batches)
        assert batch.pixels is not None and batch.latents is None and batch.text is None
        height, width = batch.pixels.shape[2:]
        seen.add((height, width))
        for caption, row in zip(batch.captions, batch.micro_conditions.tolist(), strict=True):
            assert (height, width) == nearest_bucket(sizes[caption], BUCKETS_64)
            assert tuple(row[:2]) == sizes[caption]
            assert row[4:] == [height, width]
            assert 0 <= row[2] <= height and 0 <= row[3] <= width
    assert seen == set(BUCKETS_64)


def test_bucket_batches_hold_back_at_most_a_batch_per_bucket() -> None:
    items = [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5)]
    batches = list(bucket_batches(items, 2, key=lambda item: item[0]))
    assert batches == [[("a", 0), ("a", 2)], [("b", 1), ("b", 3)]]
    last = list(bucket_batches(items, 2, key=lambda item: item[0], keep_last=True))
    assert last[2:] == [[("a", 4)], [("c", 5)]]


def write_sources(tmp_path: Path, count: int, units: int) -> dict[str, Path]:
    """The same samples as a folder, ``units`` webdataset shards and ``units`` parquet files."""
    pairs = tiny_image_captions(count)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (image, caption) in enumerate(pairs):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    per = -(-count // units)
    for u in range(units):
        rows = pairs[u * per : (u + 1) * per]
        pngs = []
        for image, _ in rows:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        table = pa.table({"image": pngs, "text": [c for _, c in rows]})
        pq.write_table(table, parquet / f"{u}.parquet")
    return {
        "folder": folder,
        "webdataset": write_webdataset(tmp_path / "wds", pairs, units),
        "parquet": parquet,
    }


@pytest.mark.parametrize("units", [3, 1])  # more units than processes, and fewer
@pytest.mark.parametrize("source", ["folder", "webdataset", "parquet"])
def test_processes_read_disjoint_shares(tmp_path: Path, source: str, units: int) -> None:
    paths = write_sources(tmp_path, 9, units)
    cfg = data_config(data=source, data_path=str(paths[source]))
    everything = [s.caption for s in one_epoch(cfg)]
    assert len(everything) == 9
    world = 2
    shares = [[s.caption for s in one_epoch(cfg, rank, world)] for rank in range(world)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)
    assert all(shares)


def test_webdataset_streams_lazily(tmp_path: Path) -> None:
    """Batches come while the shard is still being read: a shard cut short after a few of its
    40 samples gives its first batches, and fails only when the stream reaches the cut."""
    pairs = tiny_image_captions(40)
    for i in range(len(pairs)):
        pairs[i] = (pairs[i][0].resize((64, 64)), pairs[i][1])  # one bucket
    folder = write_webdataset(tmp_path / "wds", pairs, shards=1)
    shard = folder / "shard-000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 5])  # about 8 samples, then the file ends
    cfg = data_config(data="webdataset", data_path=str(folder))
    batches = TrainingData(cfg, batch_size=2, rank=0, world=1, vae_factor=8).batches(seed=0)
    first = [next(batches) for _ in range(3)]
    assert [b.captions for b in first] == [[pairs[2 * i][1], pairs[2 * i + 1][1]] for i in range(3)]
    with pytest.raises(tarfile.ReadError):
        for _ in range(20):
            next(batches)


def test_shapes_batches_are_the_former_up_front_draws(tmp_path: Path) -> None:
    """data=shapes renders each batch on demand, yet gives the batches that encoding every
    render first and drawing indices from the loop's generator gave (up to the VAE's float
    rounding, which depends on the batch it runs in)."""
    torch.set_num_threads(1)
    vae = tiny_sd15_pipeline(tmp_path / "tokenizer").vae
    cfg = data_config(train_images=12, batch_size=3, resolution=64, seed=5)
    dataset = ShapesDataset(cfg.seed, cfg.train_images)
    renders = np.stack([s.rendered.image for s in dataset])
    pixels = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        every = vae.encode(pixels).latent_dist.mean * vae.config["scaling_factor"]
    seed = 1234
    generator = torch.Generator().manual_seed(seed)
    batches = TrainingData(cfg, 3, rank=0, world=1, vae_factor=8).batches(seed)
    for _ in range(4):
        index = torch.randint(0, cfg.train_images, (3,), generator=generator)
        batch = next(batches)
        assert batch.captions == [dataset[i].caption for i in index.tolist()]
        latents = batch_latents(batch, vae, torch.device("cpu"))
        torch.testing.assert_close(latents, every[index], atol=1e-5, rtol=1e-5)
        assert batch.micro_conditions.tolist() == [[64, 64, 0, 0, 64, 64]] * 3
    # two processes draw from disjoint halves of the renders
    for rank in (0, 1):
        batch = next(TrainingData(cfg, 12, rank=rank, world=2, vae_factor=8).batches(seed))
        assert batch.pixels is not None
        for image in batch.pixels:
            found = [
                i for i in range(12) if torch.equal(image, pixels[i])
            ]  # the render it is (Shapes renders differ)
            assert found and all(i % 2 == rank for i in found)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tscd_and_lcm_from_a_webdataset_with_buckets(
    tiny_models: Any, tmp_path: Path, family: str
) -> None:
    """Two steps of TSCD (k = 2, 1) and LCM on aspect-bucketed, randomly cropped samples."""
    torch.set_num_threads(1)
    folder = write_webdataset(tmp_path / "wds", tiny_image_captions(12), shards=3)
    cfg = DistillConfig(
        teacher=str(getattr(tiny_models, family)),
        out_dir=str(tmp_path / "run"),
        data="webdataset",
        data_path=str(folder),
        resolution=64,
        bucket_step=16,
        crop="random",
        batch_size=2,
        stages=(2, 1),
        steps_per_stage=(2,),
        threads=1,
        device="cpu",
        lora_rank=4,
        lora_alpha=4,
        lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
        lr=1e-2,
        warmup_steps=1,
        disc_hidden=8,
        log_every=1,
        sample_count=2,
        sample_every=0,
    )
    assert sorted(run(cfg, "tscd")) == [1, 2]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(line["phase"], line["step"]) for line in lines] == [
        ("k2", 0),
        ("k2", 1),
        ("k1", 0),
        ("k1", 1),
    ]
    assert all(np.isfinite(line["student/loss"]) and "disc/loss" in line for line in lines)
    lcm = replace(cfg, out_dir=str(tmp_path / "lcm"), target="online")
    assert list(run(lcm, "lcm")) == [1]
    assert (tmp_path / "lcm" / "lcm" / "samples" / "final.png").exists()


def test_missing_sources_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs data_path"):
        TrainingData(data_config(data="webdataset"), 2, 0, 1, 8)
    with pytest.raises(ValueError, match=r"no \.tar shards"):
        TrainingData(data_config(data="webdataset", data_path=str(tmp_path)), 2, 0, 1, 8)
    with pytest.raises(ValueError, match="not written by hypersd-train encode"):
        TrainingData(data_config(data="encoded", data_path=str(tmp_path)), 2, 0, 1, 8)


def test_unreadable_images_are_skipped(tmp_path: Path) -> None:
    pairs = tiny_image_captions(4)
    folder = write_webdataset(tmp_path / "wds", pairs, shards=1)
    shard = folder / "shard-000.tar"
    with tarfile.open(shard, "a") as tar:
        for suffix, data in ((".png", b"not a png"), (".txt", b"a broken image")):
            member = tarfile.TarInfo(f"broken{suffix}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    cfg = data_config(data="webdataset", data_path=str(folder))
    with pytest.warns(UserWarning, match="skipped the image of 'a broken image'"):
        samples = one_epoch(cfg)
    assert [s.caption for s in samples] == [caption for _, caption in pairs]
