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

The network has one classification head per scene attribute (``training.scene_labels``).
Training runs on freshly rendered flat-style scenes, some of them negatives
(``training.negatives``), with augmentations that imitate what a generative model
or an autoencoder does to an image (``training.image_ops.augment``), kept mild
enough that a wrong colour or shape is still a wrong colour or shape.

``hypersd-train attributes [--config training/configs/attributes.yaml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypersd.shapes import Scene, ShapesDataset
from hypersd.shapes.spec import CANVAS
from training.devices import resolve_device
from training.image_ops import AugmentConfig, augment
from training.negatives import render_batch
from training.netio import (
    SmallNetLoop,
    load_weights,
    read_config,
    save_network,
    train_command,
)
from training.scene_labels import (
    HEAD_NAMES,
    HEAD_SIZES,
    HEADS,
    IGNORE,
    decode_labels,
    labels_tensor,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapes-attributes"


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
