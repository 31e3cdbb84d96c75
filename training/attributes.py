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

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from hypersd.shapes import Scene, ShapeObject, ShapesDataset, parse_caption
from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    CANVAS,
    OBJECT_COLORS,
    PLACE_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
)
from training.config import config_to_dict, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapes-attributes"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

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
}
HEAD_NAMES: tuple[str, ...] = tuple(HEADS)
HEAD_SIZES: tuple[int, ...] = tuple(len(classes) for classes in HEADS.values())


# ----------------------------------------------------------------------------- labels


def scene_labels(scene: Scene) -> tuple[int, ...]:
    """The class index of ``scene`` under every head, in ``HEAD_NAMES`` order."""
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
    )
    return tuple(HEADS[head].index(value) for head, value in zip(HEAD_NAMES, values, strict=True))


def labels_tensor(
    scenes: Sequence[Scene | str], device: torch.device | str | None = None
) -> Tensor:
    """(N, heads) long tensor of ``scene_labels``; captions are parsed first."""
    rows = [scene_labels(parse_caption(s) if isinstance(s, str) else s) for s in scenes]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), len(HEADS))


def decode_labels(labels: Sequence[int]) -> Scene | None:
    """The scene that per-head class indices describe, or None when they describe none.

    None when the heads disagree with each other (a one-object layout with an
    object B, a two-object layout without one) or the result breaks a scene
    rule (two identical objects): such an image is not correct for any caption.
    """
    values = {head: HEADS[head][int(i)] for head, i in zip(HEAD_NAMES, labels, strict=True)}
    first_fields = (values["a_size"], values["a_color"], values["a_shape"])
    second_fields = (values["b_size"], values["b_color"], values["b_shape"])
    layout = values["layout"]
    if layout in TWO_OBJECT_LAYOUTS:
        if NONE in second_fields:
            return None
        first_slot, second_slot = TWO_OBJECT_LAYOUTS[layout]
        objects = (
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
        return images.to(device)
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            if image.size != (CANVAS, CANVAS):
                image = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
            array = np.asarray(image)
        else:
            array = np.asarray(image)
            if array.shape[:2] != (CANVAS, CANVAS):
                return images_to_tensor([Image.fromarray(array) for array in images], device)
        arrays.append(array)
    if not arrays:
        return torch.zeros(0, 3, CANVAS, CANVAS, device=device)
    batch = torch.from_numpy(np.stack(arrays).astype(np.uint8)).to(device)
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
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "model_type": "shapes-attribute-net",
        "architecture": dataclasses.asdict(net.config),
        "heads": {head: list(classes) for head, classes in HEADS.items()},
        "input": "RGB float (N, 3, 64, 64) in [0, 1]",
        **(extra or {}),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_attribute_net(
    directory: str | Path = DEFAULT_MODEL_DIR, device: torch.device | str | None = None
) -> AttributeNet:
    """Load a saved network in eval mode with frozen parameters; no pickle is involved.

    The class lists saved with the weights must match this code's: a network
    trained on another version of the world would silently mislabel images.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
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
    net.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device="cpu"))
    return net.to(device or "cpu").eval().requires_grad_(False)


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


def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image separable gaussian blur (sigma (N,) in pixels; 0 leaves an image as is)."""
    n, c, h, w = images.shape
    radius = 3
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, K)
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


def _jpeg(image: Tensor, quality: int) -> Tensor:
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
        out[blur] = _gaussian_blur(out[blur], sigma[blur])
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
        out[i] = _jpeg(out[i], int(qualities[i]))
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
    steps: int = 2500
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


def render_batch(dataset: ShapesDataset, start: int, count: int) -> tuple[Tensor, list[Scene]]:
    """Render items ``start .. start + count`` of ``dataset``: (images uint8 NHWC, scenes)."""
    samples = [dataset[i] for i in range(start, start + count)]
    images = torch.from_numpy(np.stack([s.rendered.image for s in samples]))
    return images, [s.scene for s in samples]


def _to_float(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def accuracy(
    net: AttributeNet,
    images: Tensor,
    scenes: Sequence[Scene],
    batch_size: int = 500,
) -> dict[str, float]:
    """Exact-scene accuracy and per-head accuracy of ``net`` on float [0, 1] images."""
    was_training = net.training
    net.eval()
    truth = labels_tensor(scenes)
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
        result[head] = float((predicted[:, i] == truth[:, i]).float().mean())
    return result


def evaluation_sets(config: AttributesConfig) -> dict[str, tuple[Tensor, list[Scene]]]:
    """Clean and augmented renders of a held-out dataset seed, fixed for a config."""
    raw, scenes = render_batch(
        ShapesDataset(config.eval_seed, config.eval_size), 0, config.eval_size
    )
    clean = _to_float(raw, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.eval_seed)
    # every image augmented, to report the harder number
    heavy = dataclasses.replace(config.augment_config(), prob=1.0)
    augmented = torch.cat(
        [augment(clean[i : i + 500], heavy, generator) for i in range(0, len(clean), 500)]
    )
    return {"clean": (clean, scenes), "augmented": (augmented, scenes)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: AttributesConfig) -> tuple[AttributeNet, dict[str, Any]]:
    """Train on fresh renders, evaluate on held-out ones; return the net and its metrics."""
    from tqdm import tqdm

    device = pick_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    net = AttributeNet(config.net_config()).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    dataset = ShapesDataset(config.seed, config.steps * config.batch_size)
    augment_config = config.augment_config()
    generator = torch.Generator().manual_seed(config.seed)
    log_dir = Path(config.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "train_log.jsonl"
    started = time.time()
    net.train()
    with log_path.open("w") as log, tqdm(range(config.steps), desc="attributes") as bar:
        running = 0.0
        for step in bar:
            raw, scenes = render_batch(dataset, step * config.batch_size, config.batch_size)
            images = augment(_to_float(raw, device), augment_config, generator)
            labels = labels_tensor(scenes, device)
            loss = -per_head_log_prob(net(images), labels).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            if step % config.log_every == 0 or step == config.steps - 1:
                record = {
                    "step": step,
                    "loss": round(loss.item(), 6),
                    "loss_ema": round(running, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": round(time.time() - started, 1),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
    train_seconds = time.time() - started
    net.eval()
    metrics: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "device": str(device)}
    for name, (images, scenes) in evaluation_sets(config).items():
        metrics[name] = accuracy(net, images, scenes)
    return net, metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = ["| set | exact | " + " | ".join(HEAD_NAMES) + " |"]
    lines.append("|---" * (len(HEAD_NAMES) + 2) + "|")
    for name in ("clean", "augmented"):
        row = metrics[name]
        cells = [f"{row['exact']:.2%}"] + [f"{row[h]:.2%}" for h in HEAD_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hypersd-train attributes",
        description="Train the Shapes attribute network (adherence judge, FID features, reward).",
    )
    parser.add_argument("--config", help="YAML file over the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    config = load_config(AttributesConfig, args.config, [*args.overrides, *unknown])
    net, metrics = train(config)
    out = save_attribute_net(
        net, config.out, {"training": config_to_dict(config), "metrics": metrics}
    )
    print(format_metrics(metrics))
    print(f"trained in {metrics['train_seconds']} s on {metrics['device']}; saved to {out}")
    return 0
