"""The Shapes attribute network: reads a 64x64 image, predicts its scene.

It is the project's judge of the Shapes world. Three measures hang on it:

* **prompt adherence** -- an image is correct when the scene decoded from the
  network's predictions equals the caption's scene (``is_correct``);
* **FID (Shapes)** -- its penultimate feature vector (``features``) is the
  feature space the Fréchet distance is taken in, as Inception's pool layer is
  for natural images;
* **a reward model** for feedback learning -- ``log_prob`` is a differentiable
  per-image score that the image shows what the caption says (the sum of the
  log-softmax of the caption's class under every head).

The network has one classification head per attribute: background (3), layout
(7: the five one-object slots, then ``left_right`` and ``top_bottom``), and
colour / shape / size of object A (the only object, or the left / top one) and
of object B (the right / bottom one, with an extra ``none`` class for
one-object scenes, so an extra object in a one-object image costs score).

Training runs on freshly rendered flat-style scenes with augmentations that
imitate what a generative model or an autoencoder does to an image (blur,
noise, slight colour drift, JPEG and resampling softness), kept mild enough
that a wrong colour or shape is still a wrong colour or shape.

``hypersd-train attributes [--config training/configs/attributes.yaml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from hypersd.shapes import (
    Placement,
    Scene,
    ShapeObject,
    ShapesDataset,
    ShapesSample,
    parse_caption,
    render,
)
from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    CANVAS,
    OBJECT_COLORS,
    PLACE_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
)
from training.devices import resolve_device
from training.netio import (
    SmallNetLoop,
    load_weights,
    read_config,
    save_network,
    train_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapes-attributes"

NONE = "none"
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_COLORS)
ONE_OBJECT_LAYOUTS: tuple[str, ...] = tuple(PLACE_PHRASES)  # the slots
# Two-object layouts named by their slots, in RELATIONS order: left_right, top_bottom.
TWO_OBJECT_LAYOUTS: dict[str, tuple[str, str]] = {
    f"{first}_{second}": (first, second) for first, second in RELATIONS.values()
}
LAYOUTS: tuple[str, ...] = ONE_OBJECT_LAYOUTS + tuple(TWO_OBJECT_LAYOUTS)
COLORS: tuple[str, ...] = tuple(OBJECT_COLORS)
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# Head name -> its classes, in the order of the logits (and of ``scene_labels``).
HEADS: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "layout": LAYOUTS,
    "a_color": COLORS,
    "a_shape": SHAPE_NAMES,
    "a_size": SIZE_NAMES,
    "b_color": (*COLORS, NONE),
    "b_shape": (*SHAPE_NAMES, NONE),
    "b_size": (*SIZE_NAMES, NONE),
    # Anything drawn that the scene does not explain (a stray blob, a third object):
    # an image is correct only when "nothing else is drawn" (shapes-world.md).
    "extra": ("no", "yes"),
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)
HEAD_SIZES: tuple[int, ...] = tuple(len(classes) for classes in HEADS.values())


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene, extra: bool = False) -> tuple[int, ...]:
    """The class index of ``scene`` under every head, in ``HEAD_NAMES`` order.

    ``extra``: the image also shows something the scene does not (training clutter).
    """
    first = scene.objects[0]
    if len(scene.objects) == 1:
        layout = first.slot
        second: ShapeObject | None = None
    else:
        second = scene.objects[1]
        layout = next(n for n, s in TWO_OBJECT_LAYOUTS.items() if s == (first.slot, second.slot))
    values = (
        scene.background,
        layout,
        first.color,
        first.shape,
        first.size,
        second.color if second else NONE,
        second.shape if second else NONE,
        second.size if second else NONE,
        "yes" if extra else "no",
    )
    return tuple(HEADS[head].index(value) for head, value in zip(HEAD_NAMES, values, strict=True))


def labels_tensor(
    scenes: Sequence[Scene | str],
    device: torch.device | str | None = None,
    extra: Sequence[bool] | None = None,
) -> Tensor:
    """(N, heads) long tensor of ``scene_labels``; captions are parsed first."""
    flags = list(extra) if extra is not None else [False] * len(scenes)
    rows = [
        scene_labels(parse_caption(s) if isinstance(s, str) else s, flag)
        for s, flag in zip(scenes, flags, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), len(HEADS))


def decode_labels(labels: Sequence[int]) -> Scene | None:
    """The scene that per-head class indices describe, or None when they describe none.

    None when the heads disagree with each other (a one-object layout with an
    object B, a two-object layout without one), when something else is drawn
    (``extra``), or when the result breaks a scene rule (two identical
    objects): such an image is not correct for any caption.
    """
    values = {head: HEADS[head][int(i)] for head, i in zip(HEAD_NAMES, labels, strict=True)}
    if values["extra"] != "no":
        return None
    first_fields = (values["a_size"], values["a_color"], values["a_shape"])
    second_fields = (values["b_size"], values["b_color"], values["b_shape"])
    layout = values["layout"]
    if layout in TWO_OBJECT_LAYOUTS:
        if NONE in second_fields:
            return None
        first_slot, second_slot = TWO_OBJECT_LAYOUTS[layout]
        objects: tuple[ShapeObject, ...] = (
            ShapeObject(*first_fields, first_slot),
            ShapeObject(*second_fields, second_slot),
        )
    else:
        if any(v != NONE for v in second_fields):
            return None
        objects = (ShapeObject(*first_fields, layout),)
    try:
        return Scene(values["background"], objects)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- images


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


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class AttributeNetConfig:
    """The architecture: conv blocks (channels, strides), then a dense feature layer.

    The last feature map is flattened rather than pooled, so the dense layer
    knows where things are (layout is one of the attributes).
    """

    channels: tuple[int, ...] = (32, 32, 64, 64, 128, 128)
    strides: tuple[int, ...] = (2, 1, 2, 1, 2, 2)
    feature_dim: int = 128
    image_size: int = CANVAS

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("channels and strides must be non-empty and of the same length")
        if self.image_size % math.prod(self.strides):
            raise ValueError(f"image_size {self.image_size} not divisible by the total stride")


class AttributeNet(nn.Module):
    """A small CNN with one classification head per scene attribute.

    Inputs are (N, 3, 64, 64) RGB tensors in [0, 1]. Call ``net.eval()`` before
    judging images: batch statistics of generated images must not leak into
    the judgement (``load_attribute_net`` returns it in eval mode).
    """

    def __init__(self, config: AttributeNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AttributeNetConfig()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels, stride in zip(self.config.channels, self.config.strides, strict=True):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.body = nn.Sequential(*layers)
        side = self.config.image_size // math.prod(self.config.strides)
        self.feature = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, self.config.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.Linear(self.config.feature_dim, sum(HEAD_SIZES))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, images: Tensor) -> Tensor:
        """The penultimate (N, feature_dim) vector: the FID feature space."""
        return self.feature(self.body((images - 0.5) * 2.0))

    def forward(self, images: Tensor) -> Tensor:
        """(N, sum(HEAD_SIZES)) logits of every head, concatenated in ``HEAD_NAMES`` order."""
        return self.heads(self.features(images))

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(images)
        return features, self.heads(features)

    # -- judging ------------------------------------------------------------------------

    def predict_labels(self, images: Tensor) -> Tensor:
        """(N, heads) argmax class index of every head."""
        return torch.stack([part.argmax(1) for part in split_logits(self(images))], dim=1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[Scene | None]:
        """The scene each image shows, or None when the predictions form no valid scene."""
        return [decode_labels(row) for row in self.predict_labels(images).tolist()]

    @torch.no_grad()
    def is_correct(self, images: Tensor, scenes: Sequence[Scene | str]) -> Tensor:
        """(N,) bool: the image's predicted scene is exactly the caption's scene."""
        if len(scenes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(scenes)} scenes")
        truth = labels_tensor(scenes, images.device)
        return (self.predict_labels(images) == truth).all(dim=1)

    def log_prob(self, images: Tensor, scenes: Sequence[Scene | str]) -> Tensor:
        """(N,) differentiable score that each image matches its caption's attributes.

        The sum over heads of the log-softmax at the caption's class: 0 for a
        certain match, very negative for a mismatch. Gradients flow to the
        images (the network's own parameters are frozen by ``load_attribute_net``),
        which is what a reward for feedback learning needs.
        """
        if len(scenes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(scenes)} scenes")
        truth = labels_tensor(scenes, images.device)
        return per_head_log_prob(self(images), truth).sum(dim=1)


def split_logits(logits: Tensor) -> tuple[Tensor, ...]:
    """The concatenated logits cut into one tensor per head."""
    return tuple(logits.split(HEAD_SIZES, dim=1))


def per_head_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, heads) log-softmax of each head at the given class."""
    return torch.stack(
        [
            F.log_softmax(part, dim=1).gather(1, labels[:, i : i + 1]).squeeze(1)
            for i, part in enumerate(split_logits(logits))
        ],
        dim=1,
    )


# ----------------------------------------------------------------------------- save / load


def save_attribute_net(
    net: AttributeNet, directory: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, classes, ``extra``)."""
    config = {
        "model_type": "shapes-attribute-net",
        "architecture": dataclasses.asdict(net.config),
        "heads": {head: list(classes) for head, classes in HEADS.items()},
        "input": "RGB float (N, 3, 64, 64) in [0, 1]",
        **(extra or {}),
    }
    return save_network(net, directory, config)


def load_attribute_net(
    directory: str | Path = DEFAULT_MODEL_DIR, device: torch.device | str | None = None
) -> AttributeNet:
    """Load a saved network in eval mode with frozen parameters; no pickle is involved.

    The class lists saved with the weights must match this code's: a network
    trained on another version of the world would silently mislabel images.
    """
    config = read_config(directory, "shapes-attribute-net")
    saved_heads = {head: tuple(classes) for head, classes in config["heads"].items()}
    if saved_heads != HEADS:
        raise ValueError(f"{directory}: the network's classes differ from this code's")
    arch = config["architecture"]
    net = AttributeNet(
        AttributeNetConfig(
            channels=tuple(arch["channels"]),
            strides=tuple(arch["strides"]),
            feature_dim=int(arch["feature_dim"]),
            image_size=int(arch["image_size"]),
        )
    )
    return load_weights(net, directory, device)


# ----------------------------------------------------------------------------- augmentation


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


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class AttributesConfig:
    """Training config of the attribute network (saved into its config.json)."""

    seed: int = 0
    steps: int = 1800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    # architecture
    channels: tuple[int, ...] = (32, 32, 64, 64, 128, 128)
    strides: tuple[int, ...] = (2, 1, 2, 1, 2, 2)
    feature_dim: int = 128
    # augmentation (see AugmentConfig)
    augment_prob: float = 0.8
    blur_prob: float = 0.5
    blur_sigma_max: float = 1.0
    soften_prob: float = 0.25
    soften_min_size: int = 32
    jpeg_prob: float = 0.2
    jpeg_quality_min: int = 30
    color_gain: float = 0.05
    color_shift: float = 0.03
    noise_prob: float = 0.5
    noise_std_max: float = 0.04
    # negatives, labelled extra=yes: shares of training images with one extra object
    # drawn, and with one object redrawn as an off-vocabulary shape
    clutter_prob: float = 0.2
    odd_prob: float = 0.2
    # evaluation on fresh renders (a dataset seed the training never uses)
    eval_size: int = 2000
    eval_seed: int = 1_000_003
    # where and how
    out: str = "models/shapes-attributes"
    log_dir: str = "runs/attributes"
    device: str = "auto"
    num_threads: int = 1
    log_every: int = 50

    def augment_config(self) -> AugmentConfig:
        fields = {f.name for f in dataclasses.fields(AugmentConfig)}
        values = {name: getattr(self, name) for name in fields if name != "prob"}
        return AugmentConfig(prob=self.augment_prob, **values)

    def net_config(self) -> AttributeNetConfig:
        return AttributeNetConfig(self.channels, self.strides, self.feature_dim)


# Extents no Shapes object has, with a margin (small is 11-13 px, large 21-23 px):
# clutter of these sizes can never be read as a legitimate object of some caption.
CLUTTER_EXTENTS: tuple[int, ...] = (*range(4, 9), *range(16, 20))
# Shapes outside the vocabulary, among them what a blurry generator or autoencoder
# makes of real ones (a small cross turns into a diamond): an image showing one is
# correct for no caption. Only shapes that stay distinct from every real shape at
# 12 px: a hexagon or a squircle is, at that size, a circle or a square give or take
# a pixel, and training them as "odd" only taught the network label noise
# (rounded_square and hexagon are kept for probing, not trained on).
ODD_SHAPES: tuple[str, ...] = ("diamond", "ellipse", "down_triangle", "t_shape")
# The diamond is drawn most often: a small one is only a few pixels from a small
# cross, and it is the failure a soft decoder actually produces.
ODD_SHAPE_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
IGNORE = -1  # a label that is not scored (the shape head of an odd shape)


def _box_gap(a: Placement, b: Placement) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def odd_shape_coverage(kind: str, placement: Placement, rng: random.Random) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of an off-vocabulary shape in ``placement``'s box.

    Drawn like the renderer draws (4x supersampled, box-filtered), so only the
    shape itself tells it apart from a real object. ``kind`` is one of
    ``ODD_SHAPES`` or, for probing the network, ``rounded_square`` / ``hexagon``.
    """
    s = SUPERSAMPLE
    big = Image.new("L", (CANVAS * s, CANVAS * s), 0)
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (round(v * s) for v in placement.box)
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    side = x1 - x0
    if kind == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=255)
    elif kind == "ellipse":
        short = side * rng.uniform(0.45, 0.7) / 2
        if rng.random() < 0.5:
            draw.ellipse((x0, cy - short, x1 - 1, cy + short), fill=255)
        else:
            draw.ellipse((cx - short, y0, cx + short, y1 - 1), fill=255)
    elif kind == "rounded_square":
        radius = side * rng.uniform(0.28, 0.4)
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=radius, fill=255)
    elif kind == "down_triangle":
        draw.polygon([(x0, y0), (x1 - 1, y0), (cx, y1 - 1)], fill=255)
    elif kind == "t_shape":  # a cross with one arm missing
        half_bar = round(placement.extent / 3) * s // 2
        icx, icy = placement.center_x * s, placement.center_y * s
        draw.rectangle((x0, icy - half_bar, x1 - 1, icy + half_bar - 1), fill=255)
        draw.rectangle((icx - half_bar, y0, icx + half_bar - 1, y1 - 1), fill=255)
        arm = rng.choice(
            [
                (x0, y0, x1 - 1, icy - half_bar - 1),  # top
                (x0, icy + half_bar, x1 - 1, y1 - 1),  # bottom
                (x0, y0, icx - half_bar - 1, y1 - 1),  # left
                (icx + half_bar, y0, x1 - 1, y1 - 1),  # right
            ]
        )
        draw.rectangle(arm, fill=0)
    elif kind == "hexagon":
        draw.regular_polygon((cx, cy, side / 2), 6, rotation=rng.choice((0, 30)), fill=255)
    else:
        raise ValueError(f"unknown odd shape {kind!r}")
    small = big.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _composite(background: str, layers: Sequence[tuple[np.ndarray, str]]) -> np.ndarray:
    """Paint (coverage, colour name) layers over a background, as the flat renderer does."""
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_COLORS[background]
    for alpha, color in layers:
        fill = np.asarray(OBJECT_COLORS[color], np.float32)
        canvas = canvas * (1.0 - alpha[..., None]) + fill * alpha[..., None]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def add_clutter(sample: ShapesSample, rng: random.Random) -> np.ndarray | None:
    """The render with one extra object that no caption describes, or None when there is no room.

    The extra object has a palette colour, any shape, an extent no real object
    has, and sits anywhere on the canvas (edges included) at least 2 px from
    the scene's objects, so the scene itself stays intact.
    """
    extent = rng.choice(CLUTTER_EXTENTS)
    half = math.ceil(extent / 2)
    for _ in range(30):
        placement = Placement(
            rng.randint(half, CANVAS - half), rng.randint(half, CANVAS - half), extent
        )
        if all(_box_gap(placement, other) >= 2 for other in sample.rendered.placements):
            break
    else:
        return None
    color = rng.choice(COLORS)
    scene = Scene(
        sample.scene.background,
        (ShapeObject("small", color, rng.choice(SHAPE_NAMES), "center"),),
    )
    alpha = render(scene, placements=(placement,)).coverage[0]
    objects = zip(sample.rendered.coverage, sample.scene.objects, strict=True)
    layers = [(coverage, obj.color) for coverage, obj in objects]
    return _composite(sample.scene.background, [*layers, (alpha, color)])


def add_odd_shape(sample: ShapesSample, rng: random.Random) -> tuple[np.ndarray, int]:
    """The render with one of its objects redrawn as an off-vocabulary shape.

    Returns the image and the index of the changed object (same place, size, colour).
    """
    index = rng.randrange(len(sample.scene.objects))
    kind = rng.choices(ODD_SHAPES, weights=ODD_SHAPE_WEIGHTS)[0]
    layers = []
    objects = zip(sample.rendered.coverage, sample.scene.objects, strict=True)
    for i, (coverage, obj) in enumerate(objects):
        if i == index:
            coverage = odd_shape_coverage(kind, sample.rendered.placements[i], rng)
        layers.append((coverage, obj.color))
    return _composite(sample.scene.background, layers), index


def render_batch(
    dataset: ShapesDataset,
    start: int,
    count: int,
    clutter_prob: float = 0.0,
    odd_prob: float = 0.0,
) -> tuple[Tensor, list[Scene], Tensor, list[str]]:
    """Render items ``start .. start + count`` with their training labels.

    Each item is, by its own RNG (the dataset's seed and the index, so batches
    are reproducible), a plain render, a render with clutter (probability
    ``clutter_prob``) or one with an odd shape (``odd_prob``); both negatives
    are labelled ``extra = yes``, and an odd shape's shape head is not scored.

    Returns: images uint8 (N, H, W, 3), scenes, labels (N, heads) with
    ``IGNORE`` where not scored, and each item's variant (clean / clutter / odd).
    """
    images, scenes, rows, variants = [], [], [], []
    for index in range(start, start + count):
        sample = dataset[index]
        rng = random.Random(f"negatives:{dataset.seed}:{index}")
        draw = rng.random()
        image, variant = sample.rendered.image, "clean"
        labels = list(scene_labels(sample.scene))
        if draw < clutter_prob:
            cluttered = add_clutter(sample, rng)
            if cluttered is not None:
                image, variant = cluttered, "clutter"
        elif draw < clutter_prob + odd_prob:
            image, changed = add_odd_shape(sample, rng)
            variant = "odd"
            labels[HEAD_NAMES.index("a_shape" if changed == 0 else "b_shape")] = IGNORE
        if variant != "clean":
            labels[HEAD_NAMES.index("extra")] = HEADS["extra"].index("yes")
        images.append(image)
        scenes.append(sample.scene)
        rows.append(labels)
        variants.append(variant)
    labels_out = torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(HEADS))
    return torch.from_numpy(np.stack(images)), scenes, labels_out, variants


def _to_float(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device).permute(0, 3, 1, 2).float().div_(255.0)


def training_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over images of the summed per-head cross-entropy; ``IGNORE`` labels cost nothing."""
    scored = labels != IGNORE
    log_probs = per_head_log_prob(logits, labels.clamp_min(0))
    return -(log_probs * scored).sum(1).mean()


@torch.no_grad()
def accuracy(
    net: AttributeNet,
    images: Tensor,
    scenes: Sequence[Scene],
    labels: Tensor,
    batch_size: int = 500,
) -> dict[str, float]:
    """Exact-scene accuracy and per-head accuracy (scored labels only) on [0, 1] images.

    On negatives (clutter, odd shapes) "exact" is the share judged correct for
    the caption, which must be ~0.
    """
    was_training = net.training
    net.eval()
    predicted = torch.cat(
        [
            net.predict_labels(images[i : i + batch_size].to(net.device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    net.train(was_training)
    decoded = [decode_labels(row) for row in predicted.tolist()]
    result = {
        "exact": float(np.mean([d == s for d, s in zip(decoded, scenes, strict=True)])),
    }
    for i, head in enumerate(HEAD_NAMES):
        scored = labels[:, i] != IGNORE
        hits = (predicted[:, i] == labels[:, i])[scored]
        result[head] = float(hits.float().mean()) if len(hits) else float("nan")
    return result


def evaluation_sets(config: AttributesConfig) -> dict[str, tuple[Tensor, list[Scene], Tensor]]:
    """Held-out renders (a dataset seed training never uses), fixed for a config.

    ``clean``: plain renders; ``augmented``: every one of them degraded;
    ``clutter``: with an extra object drawn (where there is room); ``odd``:
    with one object redrawn as an off-vocabulary shape.
    """
    dataset = ShapesDataset(config.eval_seed, config.eval_size)
    raw, scenes, labels, _ = render_batch(dataset, 0, config.eval_size)
    clean = _to_float(raw, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.eval_seed)
    heavy = dataclasses.replace(config.augment_config(), prob=1.0)
    augmented = torch.cat(
        [augment(clean[i : i + 500], heavy, generator) for i in range(0, len(clean), 500)]
    )
    sets = {"clean": (clean, scenes, labels), "augmented": (augmented, scenes, labels)}
    for name, options in (("clutter", {"clutter_prob": 1.0}), ("odd", {"odd_prob": 1.0})):
        raw, scenes, labels, variants = render_batch(dataset, 0, config.eval_size, **options)
        keep = torch.tensor([v == name for v in variants])
        kept = [s for s, k in zip(scenes, keep.tolist(), strict=True) if k]
        sets[name] = (_to_float(raw[keep], torch.device("cpu")), kept, labels[keep])
    return sets


def train(config: AttributesConfig) -> tuple[AttributeNet, dict[str, Any]]:
    """Train on fresh renders, evaluate on held-out ones; return the net and its metrics."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    net = AttributeNet(config.net_config()).to(device)
    dataset = ShapesDataset(config.seed, config.steps * config.batch_size)
    augment_config = config.augment_config()
    generator = torch.Generator().manual_seed(config.seed)
    net.train()
    with SmallNetLoop(
        net,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        steps=config.steps,
        log_every=config.log_every,
        log_dir=config.log_dir,
        desc="attributes",
    ) as loop:
        for step in loop:
            raw, _, labels, _ = render_batch(
                dataset,
                step * config.batch_size,
                config.batch_size,
                config.clutter_prob,
                config.odd_prob,
            )
            images = augment(_to_float(raw, device), augment_config, generator)
            loop.update(step, training_loss(net(images), labels.to(device)))
    train_seconds = loop.seconds
    net.eval()
    metrics: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "device": str(device)}
    for name, (images, scenes, labels) in evaluation_sets(config).items():
        metrics[name] = {"count": len(scenes), **accuracy(net, images, scenes, labels)}
    # on the negatives "exact" is the share judged correct for the caption: it must be ~0
    for name in ("clutter", "odd"):
        metrics[name]["judged_correct"] = metrics[name].pop("exact")
    return net, metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """The held-out accuracies as a markdown table (exact scene, then every head).

    For the negative sets (clutter, odd shapes) the first column is the share
    judged *correct* for the caption, which should be ~0.
    """
    lines = ["| set | images | exact scene | " + " | ".join(HEAD_NAMES) + " |"]
    lines.append("|---" * (len(HEAD_NAMES) + 3) + "|")
    for name in ("clean", "augmented", "clutter", "odd"):
        row = metrics[name]
        exact = row["exact"] if "exact" in row else row["judged_correct"]
        cells = [str(row["count"]), f"{exact:.2%}"] + [f"{row[h]:.2%}" for h in HEAD_NAMES]
        label = name if "exact" in row else f"{name} (judged correct)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return train_command(
        argv,
        prog="hypersd-train attributes",
        description="Train the Shapes attribute network (adherence judge, FID features, reward).",
        config_type=AttributesConfig,
        train=train,
        save=save_attribute_net,
        format_metrics=format_metrics,
    )
