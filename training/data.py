"""Training data: where a stage's images, captions and prompts come from.

Distillation (TSCD, LCM) streams batches (``TrainingData.batches``); no step holds the data set:

- ``data=shapes`` renders Shapes scenes on demand (``train_images`` of them, drawn at random;
  square, so one bucket and no crop);
- ``data=folder|webdataset|parquet`` read image-caption pairs (``training.data_sources``) unit by
  unit (file, shard, row group); each image goes to the aspect-ratio bucket nearest its own
  (``aspect_buckets``: ~``resolution``² pixels, sides multiples of ``bucket_step``, aspect up to
  ``bucket_max_ratio``), is cropped to the bucket's aspect (``crop``: center or random) and
  resized to it; its original size and crop's top-left corner (in the resized image) become
  SDXL's time ids. A batch is ``batch_size`` samples of one bucket; the latents are encoded per
  batch (``batch_latents``);
- ``data=encoded``: the latents and text embeddings ``hypersd-train encode`` wrote
  (``training.encode``), a shard at a time.

Under ``accelerate launch`` each process reads a disjoint share (``data_sources.share``: every
``world``-th shard, file or row group, or every ``world``-th sample when there are fewer units
than processes); each epoch visits the units in a new order (the same in every process).

The feedback and DMD stages sample from the student instead: ``next_batch`` gives each step its
prompts, rendered Shapes scenes (with their latents and true masks, for the structure loss),
lines of a prompts file, or the captions of a webdataset or an encoded folder (``PromptCycle``:
read as they are needed).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from PIL import Image

from hypersd.shapes import ShapesDataset
from training.data_sources import (
    ENCODED_META,
    EncodedSample,
    RawSample,
    StreamSource,
    encoded_captions,
    encoded_meta,
    encoded_units,
    folder_units,
    parquet_units,
    read_encoded,
    read_folder,
    read_parquet,
    read_webdataset,
    read_webdataset_captions,
    share,
    webdataset_units,
)
from training.distributed import process_seed
from training.segmentation import masks_tensor
from training.teacher import TextEmbeddings, micro_conditions

if TYPE_CHECKING:  # the feedback stage's config, whose module imports this one
    from training.enhance import EnhanceConfig

DataSource = Literal["shapes", "folder", "webdataset", "parquet", "encoded"]
Crop = Literal["center", "random"]
Sample = TypeVar("Sample")


class DataSettings(Protocol):
    """The data fields of a config (``DistillConfig``, ``EncodeConfig``)."""

    @property
    def data(self) -> DataSource: ...
    @property
    def data_path(self) -> str | None: ...
    @property
    def image_column(self) -> str: ...
    @property
    def caption_column(self) -> str: ...
    @property
    def train_images(self) -> int: ...
    @property
    def resolution(self) -> int: ...
    @property
    def crop(self) -> Crop: ...
    @property
    def bucket_step(self) -> int: ...
    @property
    def bucket_max_ratio(self) -> float: ...
    @property
    def seed(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# aspect-ratio buckets and crops


def aspect_buckets(
    resolution: int, step: int = 64, max_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """The (height, width) buckets: sides multiples of ``step``, ~``resolution``² pixels, aspect
    ratios within [1 / ``max_ratio``, ``max_ratio``]; always including the square one."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of bucket_step {step}")
    if max_ratio < 1:
        raise ValueError(f"bucket_max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + 1, step):
        height = max(step, round(area / width / step) * step)
        if max(height / width, width / height) <= max_ratio:
            buckets |= {(height, width), (width, height)}
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to ``size`` = (height, width)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


@dataclass
class ImageSample:
    """An image cropped and resized to its bucket: ``pixels`` (H, W, 3) uint8, its caption,
    original size (height, width) and crop top-left (top, left) in the resized image."""

    pixels: np.ndarray
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def fit_to_bucket(
    image: Image.Image, bucket: tuple[int, int], crop: Crop, rng: random.Random
) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop ``image`` to ``bucket``'s aspect ratio (its centre, or a random window) and resize it
    to the bucket (bicubic): the pixels, and the crop's top-left corner in the image resized to
    cover the bucket (SDXL's ``crops_coords_top_left``)."""
    image = image.convert("RGB")
    height, width = bucket
    scale = max(height / image.height, width / image.width)  # the resize covering the bucket
    crop_h = min(image.height, round(height / scale))
    crop_w = min(image.width, round(width / scale))
    if crop == "center":
        top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
    elif crop == "random":
        top, left = rng.randint(0, image.height - crop_h), rng.randint(0, image.width - crop_w)
    else:
        raise ValueError(f"crop={crop!r}; allowed: center, random")
    window = image.crop((left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(window.resize((width, height), Image.Resampling.BICUBIC))
    return pixels, (round(top * scale), round(left * scale))


def prepare(
    raw: RawSample, buckets: list[tuple[int, int]], crop: Crop, rng: random.Random
) -> ImageSample:
    """A read sample in its nearest bucket, cropped and resized."""
    image = raw.open()
    size = (image.height, image.width)
    pixels, corner = fit_to_bucket(image, nearest_bucket(size, buckets), crop, rng)
    return ImageSample(pixels, raw.caption, size, corner)


def bucket_batches(
    samples: Iterable[Sample],
    batch_size: int,
    key: Callable[[Sample], Hashable],
    keep_last: bool = False,
) -> Iterator[list[Sample]]:
    """Batches of ``batch_size`` samples with one ``key`` (bucket), as soon as a bucket fills:
    at most (buckets x (batch_size - 1)) samples wait; ``keep_last``: the part-filled batches
    too, once ``samples`` ends."""
    pending: dict[Hashable, list[Sample]] = {}
    for sample in samples:
        group = pending.setdefault(key(sample), [])
        group.append(sample)
        if len(group) == batch_size:
            yield pending.pop(key(sample))
    if keep_last:
        yield from (group for group in pending.values() if group)


# ---------------------------------------------------------------------------------------------
# streams and batches


def _units(settings: DataSettings) -> list[Any]:
    source = settings.data
    if source == "folder":
        return folder_units(settings.data_path)
    if source == "parquet":
        return parquet_units(settings.data_path, settings.image_column, settings.caption_column)
    if source == "encoded":
        return encoded_units(settings.data_path)
    if source == "webdataset":
        return webdataset_units(settings.data_path)
    raise ValueError(f"data={source!r}; allowed: shapes, folder, webdataset, parquet, encoded")


def _read(settings: DataSettings, units: list[Any]) -> Iterator[RawSample | EncodedSample]:
    source: StreamSource = settings.data  # type: ignore[assignment]  # shapes is not streamed
    if source == "folder":
        return read_folder(units)
    if source == "webdataset":
        return read_webdataset(units)
    if source == "parquet":
        return read_parquet(units, settings.image_column, settings.caption_column)
    return read_encoded(units)


def stream_samples(
    settings: DataSettings, rank: int, world: int, seed: int, epochs: int | None = None
) -> Iterator[ImageSample | EncodedSample]:
    """Process ``rank``'s share of a streamed source, bucketed and cropped (images), epoch after
    epoch (``epochs``; None: for ever). The units' order is shuffled per epoch by ``seed`` (the
    same in every process, so the shares stay disjoint); random crops draw per process."""
    units = _units(settings)
    buckets = aspect_buckets(settings.resolution, settings.bucket_step, settings.bucket_max_ratio)
    rng = random.Random(f"crop:{seed}:{rank}")
    for epoch in itertools.count() if epochs is None else range(epochs):
        order = list(units)
        random.Random(f"units:{seed}:{epoch}").shuffle(order)
        mine, stride = share(order, rank, world)
        count = 0
        for index, sample in enumerate(_read(settings, mine)):
            if index % stride != rank % stride:
                continue
            if isinstance(sample, EncodedSample):
                count += 1
                yield sample
                continue
            try:
                prepared = prepare(sample, buckets, settings.crop, rng)
            except OSError as error:  # PIL: not an image, or a truncated one (web data has some)
                warnings.warn(
                    f"skipped the image of {sample.caption[:60]!r}: {error}", stacklevel=2
                )
                continue
            count += 1
            yield prepared
        if count == 0:
            raise ValueError(f"no samples for process {rank} of {world} in {settings.data_path}")


@dataclass
class TrainBatch:
    """One distillation step's samples, of one bucket.

    ``pixels`` ``(B, 3, H, W)`` in [-1, 1] (to encode: ``batch_latents``) or pre-encoded
    ``latents`` and ``text`` embeddings; ``micro_conditions`` ``(B, 6)``: SDXL's time ids.
    """

    captions: list[str]
    micro_conditions: torch.Tensor
    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    text: TextEmbeddings | None = None


def image_batch(samples: list[ImageSample]) -> TrainBatch:
    """Stack one bucket's image samples."""
    pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    target = (int(pixels.shape[2]), int(pixels.shape[3]))
    micro = micro_conditions(
        [s.original_size for s in samples], [s.crop_top_left for s in samples], target
    )
    return TrainBatch([s.caption for s in samples], micro, pixels=pixels)


def encoded_batch(samples: list[EncodedSample], vae_factor: int) -> TrainBatch:
    """Stack one bucket's pre-encoded samples (``vae_factor``: pixels per latent)."""
    latents = torch.stack([s.latents for s in samples])
    target = (latents.shape[2] * vae_factor, latents.shape[3] * vae_factor)
    pooled = [s.pooled for s in samples if s.pooled is not None]
    text = TextEmbeddings(
        torch.stack([s.hidden for s in samples]),
        torch.stack(pooled) if len(pooled) == len(samples) else None,
    )
    micro = micro_conditions(
        [s.original_size for s in samples], [s.crop_top_left for s in samples], target
    )
    return TrainBatch([s.caption for s in samples], micro, latents=latents, text=text)


def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Scaled VAE latents (the posterior's mean) of ``pixels`` in [-1, 1], float32, no grad."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return (posterior.mean * float(vae.config["scaling_factor"])).float()


def batch_latents(batch: TrainBatch, vae: AutoencoderKL, device: torch.device) -> torch.Tensor:
    """The batch's latents on ``device``: pre-encoded, or its pixels encoded now."""
    if batch.latents is not None:
        return batch.latents.to(device)
    assert batch.pixels is not None
    return encode_pixels(vae, batch.pixels, device)


def vae_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along a side."""
    return int(2 ** (len(vae.config["block_out_channels"]) - 1))


def shapes_pixels(dataset: ShapesDataset, indices: list[int], resolution: int) -> np.ndarray:
    """Renders ``indices`` of ``dataset`` (64 x 64), resized to ``resolution``: (N, H, W, 3)."""
    images = [dataset[i].rendered.image for i in indices]
    if resolution != 64:
        images = [
            np.asarray(Image.fromarray(im).resize((resolution,) * 2, Image.Resampling.BICUBIC))
            for im in images
        ]
    return np.stack(images)


class TrainingData:
    """A distillation run's data for process ``rank`` of ``world``: endless batches.

    Args:
        settings: the config's data fields.
        batch_size: samples per batch (per process).
        rank: this process's index; world: the number of processes.
        vae_factor: pixels per latent (the teacher VAE's), for pre-encoded batches' sizes.
    """

    def __init__(
        self, settings: DataSettings, batch_size: int, rank: int, world: int, vae_factor: int
    ) -> None:
        self.settings, self.batch_size = settings, batch_size
        self.rank, self.world, self.vae_factor = rank, world, vae_factor
        if settings.data != "shapes":
            _units(settings)  # a missing or empty source fails here, not at the first step
        if settings.data == "encoded":
            encoded = encoded_meta(settings.data_path)["settings"]["resolution"]
            if encoded != settings.resolution:
                raise ValueError(
                    f"{settings.data_path} was encoded at resolution {encoded}, "
                    f"not {settings.resolution}"
                )

    def batches(self, seed: int) -> Iterator[TrainBatch]:
        """Endless batches drawn from ``seed`` (the same in every process)."""
        if self.settings.data == "shapes":
            yield from self._shapes_batches(seed)
            return
        samples = stream_samples(self.settings, self.rank, self.world, seed)
        for group in bucket_batches(samples, self.batch_size, bucket_key):
            if isinstance(group[0], EncodedSample):
                yield encoded_batch(group, self.vae_factor)  # type: ignore[arg-type]
            else:
                yield image_batch(group)  # type: ignore[arg-type]

    def _shapes_batches(self, seed: int) -> Iterator[TrainBatch]:
        """Shapes renders drawn at random (with replacement) from this process's share (every
        ``world``-th of ``train_images``); in one process the draws of a generator seeded by
        ``seed``, as when the renders were encoded up front."""
        settings = self.settings
        dataset = ShapesDataset(settings.seed, settings.train_images)
        size = len(range(self.rank, len(dataset), self.world))
        generator = torch.Generator().manual_seed(process_seed(seed, self.rank))
        resolution = settings.resolution
        while True:
            drawn = torch.randint(0, size, (self.batch_size,), generator=generator)
            indices = [i * self.world + self.rank for i in drawn.tolist()]
            pixels = torch.from_numpy(shapes_pixels(dataset, indices, resolution))
            micro = micro_conditions(
                [(64, 64)] * len(indices), [(0, 0)] * len(indices), (resolution, resolution)
            )
            yield TrainBatch(
                [dataset[i].caption for i in indices],
                micro,
                pixels=pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0,
            )

    def first_captions(self, count: int) -> list[str]:
        """The source's first ``count`` captions (not Shapes'), e.g. for sample grids."""
        if self.settings.data == "encoded":
            assert self.settings.data_path is not None
            return list(itertools.islice(encoded_captions(self.settings.data_path), count))
        raw = _read(self.settings, _units(self.settings))
        return [sample.caption for sample in itertools.islice(raw, count)]


def bucket_key(sample: ImageSample | EncodedSample) -> Hashable:
    """A sample's bucket: its pixels' or latents' shape."""
    if isinstance(sample, EncodedSample):
        return tuple(sample.latents.shape)
    return sample.pixels.shape


# ---------------------------------------------------------------------------------------------
# feedback and DMD: each step's prompts


@dataclass
class Batch:
    """One step's prompts; for Shapes also their renders' latents and true instance masks."""

    captions: list[str]
    latent_shape: tuple[int, ...]
    render_latents: torch.Tensor | None = None
    masks: torch.Tensor | None = None


class PromptCycle:
    """The prompts of ``path`` by index, cycled, streamed: a text file (one per non-empty line),
    a webdataset (a ``.tar`` or a folder of them: the ``.txt`` captions) or an encoded folder
    (``meta.json``: its captions). Only the reader's position is held: indices asked in order
    (a run's steps) read on; a smaller one starts the reading again. The number of prompts is
    learnt at the first end of the source, and later indices wrap around it."""

    def __init__(self, path: str) -> None:
        self.path, self.total = path, 0
        self._restart()

    def _read(self) -> Iterator[str]:
        path = Path(self.path)
        if not path.exists():
            raise ValueError(f"prompts={self.path}: no such file or folder")
        if (path / ENCODED_META).exists():
            captions: Iterable[str] = encoded_captions(self.path)
        elif path.is_dir() or path.suffix == ".tar":
            captions = read_webdataset_captions(webdataset_units(self.path))
        else:
            captions = path.read_text().splitlines()
        return (caption.strip() for caption in captions if caption.strip())

    def _restart(self) -> None:
        self.captions, self.position = self._read(), 0

    def __getitem__(self, index: int) -> str:
        index = index % self.total if self.total else index
        if index < self.position:
            self._restart()
        for caption in self.captions:
            self.position += 1
            if self.position > index:
                return caption
        if self.position == 0:
            raise ValueError(f"no prompts in {self.path}")
        self.total = self.position  # the end: every prompt counted
        self._restart()
        return self[index]


@functools.lru_cache(maxsize=4)
def prompt_cycle(path: str) -> PromptCycle:
    """The run's ``PromptCycle`` of ``path`` (one per path, so steps read on from the last)."""
    return PromptCycle(path)


def next_batch(
    cfg: EnhanceConfig,
    step: int,
    vae: AutoencoderKL,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Batch:
    """Step ``step``'s batch for process ``rank`` of ``world``: Shapes scenes (rendered), or
    prompts of ``cfg.prompts`` (a text file, a webdataset's or an encoded folder's captions:
    ``PromptCycle``). Each process takes the batch at global index ``step * world + rank``, so
    processes get different prompts."""
    first = (step * world + rank) * cfg.batch_size
    if cfg.prompts is not None:
        prompts = prompt_cycle(cfg.prompts)
        captions = [prompts[first + i] for i in range(cfg.batch_size)]
        side = cfg.resolution // vae_factor(vae)
        shape = (cfg.batch_size, int(vae.config["latent_channels"]), side, side)
        return Batch(captions, shape)
    dataset = ShapesDataset(cfg.seed + 7, 10**9)
    samples = [dataset[first + i] for i in range(cfg.batch_size)]
    pixels = torch.from_numpy(np.stack([s.rendered.image for s in samples]))
    pixels = pixels.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
    latents = encode_pixels(vae, pixels, device)  # in the VAE's dtype (weight_dtype=bf16)
    masks = masks_tensor([s.rendered for s in samples], device)
    return Batch([s.caption for s in samples], tuple(latents.shape), latents, masks)
