"""The Shapes instance-segmentation model: per-slot instance masks of a 64x64 image.

The SOLO analogue of Hyper-SD's structure loss (§3.2). The network predicts a
fixed number of mask slots at the full 64x64 resolution:

* slot 0 -- the scene's first object: the only one, or the left / top one;
* slot 1 -- the second object (the right / bottom one); empty in one-object scenes.

This is the order of ``Scene.objects`` and of ``Rendered.coverage``, so the
ground truth of a render is simply its masks in order (``slot_masks``), padded
with empty slots. Which slot an object belongs to depends on the whole image (a
lone object on the right is slot 0, the right one of a pair is slot 1), so the
U-Net's bottleneck sees a global max-pooled summary of the image, and the input
carries two coordinate channels.

The output is logits: use it as
``structure_loss(x0, masks, net, from_logits=True)``
(``training.objectives.feedback``). Training minimises exactly that loss (BCE +
dice against ``Rendered.masks()``) on fresh renders, most of them degraded with
the attribute network's augmentation (blur, noise, colour drift, JPEG, soft
resampling) so that the masks stay right on generated images.

``hypersd-train segmentation [--config training/configs/segmentation.yaml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypersd.shapes import Rendered, ShapesDataset
from hypersd.shapes.spec import CANVAS
from training.devices import resolve_device
from training.image_ops import AugmentConfig, augment, images_to_tensor
from training.netio import (
    SmallNetLoop,
    load_weights,
    read_config,
    save_network,
    train_command,
)
from training.objectives.feedback import structure_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapes-segmentation"

SLOTS: tuple[str, ...] = ("first", "second")
"""Mask slots: the only / left / top object, then the right / bottom object."""
NUM_SLOTS = len(SLOTS)


# ----------------------------------------------------------------------------- ground truth


def slot_masks(rendered: Rendered, threshold: float = 0.5) -> np.ndarray:
    """(NUM_SLOTS, H, W) bool ground truth of a render, in slot order; missing objects empty."""
    masks = rendered.masks(threshold)
    out = np.zeros((NUM_SLOTS, *masks.shape[1:]), dtype=bool)
    out[: len(masks)] = masks[:NUM_SLOTS]
    return out


def masks_tensor(rendered: Sequence[Rendered], device: torch.device | str | None = None) -> Tensor:
    """(N, NUM_SLOTS, H, W) float {0, 1} ground-truth masks of renders (``slot_masks``)."""
    if not rendered:
        return torch.zeros(0, NUM_SLOTS, CANVAS, CANVAS, device=device)
    return torch.from_numpy(np.stack([slot_masks(r) for r in rendered])).float().to(device)


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class SegmentationNetConfig:
    """The U-Net: channels per resolution level (64, 32, 16, 8 px for four levels)."""

    channels: tuple[int, ...] = (12, 24, 48, 64)
    num_slots: int = NUM_SLOTS

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ValueError("the U-Net needs at least two levels")


def _block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegmentationNet(nn.Module):
    """A small U-Net: (N, 3, 64, 64) [0, 1] images -> (N, num_slots, 64, 64) mask logits.

    Call ``net.eval()`` before use (``load_segmentation_model`` returns it in
    eval mode with frozen parameters).
    """

    def __init__(self, config: SegmentationNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or SegmentationNetConfig()
        ch = self.config.channels
        self.down = nn.ModuleList([nn.Sequential(_block(5, ch[0]), _block(ch[0], ch[0]))])
        for prev, cur in itertools.pairwise(ch):
            self.down.append(nn.Sequential(_block(prev, cur, 2), _block(cur, cur)))
        # the bottleneck sees a global summary: which slot an object is depends on the others
        self.context = nn.Sequential(
            nn.Conv2d(2 * ch[-1], ch[-1], 1, bias=False),
            nn.BatchNorm2d(ch[-1]),
            nn.ReLU(inplace=True),
            _block(ch[-1], ch[-1]),
        )
        self.up = nn.ModuleList(
            [_block(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(len(ch) - 1))]
        )
        self.out = nn.Conv2d(ch[0], self.config.num_slots, 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        """(N, num_slots, H, W) mask logits (sigmoid > 0.5 is the mask)."""
        n, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(n, 2, h, w)
        x = torch.cat([(images - 0.5) * 2.0, grid], dim=1)
        skips = []
        for level in self.down:
            x = level(x)
            skips.append(x)
        summary = x.amax(dim=(2, 3), keepdim=True).expand_as(x)
        x = self.context(torch.cat([x, summary], dim=1))
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)

    def probabilities(self, images: Tensor) -> Tensor:
        """(N, num_slots, H, W) mask probabilities."""
        return self(images).sigmoid()

    @torch.no_grad()
    def predict_masks(self, images: Tensor, threshold: float = 0.5) -> Tensor:
        """(N, num_slots, H, W) bool masks."""
        return self.probabilities(images) > threshold


# ----------------------------------------------------------------------------- save / load


def save_segmentation_model(
    net: SegmentationNet, directory: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, slots, ``extra``)."""
    config = {
        "model_type": "shapes-segmentation-net",
        "architecture": dataclasses.asdict(net.config),
        "slots": list(SLOTS),
        "input": "RGB float (N, 3, 64, 64) in [0, 1]",
        "output": "(N, slots, 64, 64) mask logits",
        **(extra or {}),
    }
    return save_network(net, directory, config)


def load_segmentation_model(
    directory: str | Path = DEFAULT_MODEL_DIR, device: torch.device | str | None = None
) -> SegmentationNet:
    """Load a saved model in eval mode with frozen parameters; no pickle is involved."""
    config = read_config(directory, "shapes-segmentation-net")
    if tuple(config["slots"]) != SLOTS:
        raise ValueError(f"{directory}: the model's slots differ from this code's")
    arch = config["architecture"]
    net = SegmentationNet(
        SegmentationNetConfig(channels=tuple(arch["channels"]), num_slots=int(arch["num_slots"]))
    )
    return load_weights(net, directory, device)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def mask_iou(predicted: Tensor, target: Tensor) -> Tensor:
    """(N, slots) IoU of bool masks; 1 where both are empty."""
    predicted, target = predicted.bool(), target.bool()
    intersection = (predicted & target).sum((-2, -1)).float()
    union = (predicted | target).sum((-2, -1)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def evaluate(
    net: SegmentationNet, images: Tensor, masks: Tensor, batch_size: int = 250
) -> dict[str, float]:
    """Mean IoU per slot on the images where the slot holds an object, and empty-slot rates.

    ``slot{i}_iou``: mean IoU over images whose slot i is an object;
    ``empty_slot_clean``: share of images with an empty slot where it is predicted empty
    (fewer than 5 pixels).
    """
    was_training = net.training
    net.eval()
    predicted = torch.cat(
        [
            net.predict_masks(images[i : i + batch_size].to(net.device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    net.train(was_training)
    iou = mask_iou(predicted, masks)
    present = masks.sum((-2, -1)) > 0
    result: dict[str, float] = {"count": float(len(images))}
    for slot in range(masks.shape[1]):
        result[f"slot{slot}_iou"] = round(iou[present[:, slot], slot].mean().item(), 4)
        result[f"slot{slot}_count"] = float(present[:, slot].sum().item())
    empty = ~present
    if empty.any():
        clean = predicted.sum((-2, -1)) < 5
        result["empty_slot_clean"] = round(clean[empty].float().mean().item(), 4)
    return result


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SegmentationConfig:
    """Training config of the segmentation model (saved into its config.json)."""

    seed: int = 0
    steps: int = 1100
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    dice_weight: float = 1.0
    # architecture
    channels: tuple[int, ...] = (12, 24, 48, 64)
    # augmentation (training.image_ops.AugmentConfig), somewhat stronger than the
    # attribute network's: generated images are blurrier and noisier than renders
    augment_prob: float = 0.7
    blur_prob: float = 0.5
    blur_sigma_max: float = 1.5
    soften_prob: float = 0.25
    soften_min_size: int = 32
    jpeg_prob: float = 0.2
    jpeg_quality_min: int = 30
    color_gain: float = 0.08
    color_shift: float = 0.05
    noise_prob: float = 0.5
    noise_std_max: float = 0.08
    # evaluation on fresh renders (a dataset seed the training never uses)
    eval_size: int = 500
    eval_seed: int = 3_000_003
    # where and how
    out: str = "models/shapes-segmentation"
    log_dir: str = "runs/segmentation"
    device: str = "auto"
    num_threads: int = 1
    log_every: int = 50

    def augment_config(self) -> AugmentConfig:
        fields = {f.name for f in dataclasses.fields(AugmentConfig)}
        values = {name: getattr(self, name) for name in fields if name != "prob"}
        return AugmentConfig(prob=self.augment_prob, **values)

    def net_config(self) -> SegmentationNetConfig:
        return SegmentationNetConfig(self.channels, NUM_SLOTS)


def render_batch(dataset: ShapesDataset, start: int, count: int) -> tuple[Tensor, Tensor]:
    """(images (count, 3, 64, 64) in [0, 1], masks (count, NUM_SLOTS, 64, 64)) of renders."""
    rendered = [dataset[i].rendered for i in range(start, start + count)]
    return images_to_tensor([r.image for r in rendered]), masks_tensor(rendered)


def train(config: SegmentationConfig) -> tuple[SegmentationNet, dict[str, Any]]:
    """Train on fresh renders, evaluate on held-out ones; return the net and its metrics."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    net = SegmentationNet(config.net_config()).to(device)
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
        desc="segmentation",
    ) as loop:
        for step in loop:
            images, masks = render_batch(dataset, step * config.batch_size, config.batch_size)
            images = augment(images, augment_config, generator)
            terms = structure_loss(
                images.to(device),
                masks.to(device),
                net,
                from_logits=True,
                dice_weight=config.dice_weight,
            )
            loop.update(step, terms["loss"], bce=terms["bce"], dice=terms["dice"])
    train_seconds = loop.seconds
    net.eval()
    images, masks = render_batch(
        ShapesDataset(config.eval_seed, config.eval_size), 0, config.eval_size
    )
    heavy = dataclasses.replace(augment_config, prob=1.0)
    augmented = augment(images, heavy, torch.Generator().manual_seed(config.eval_seed))
    metrics: dict[str, Any] = {
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "clean": evaluate(net, images, masks),
        "augmented": evaluate(net, augmented, masks),
    }
    return net, metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """Held-out mean IoU per slot as a markdown table."""
    lines = [
        "| set | images | slot 0 IoU | slot 1 IoU (two-object scenes) "
        "| empty slot predicted empty |",
        "|---|---|---|---|---|",
    ]
    for name in ("clean", "augmented"):
        row = metrics[name]
        lines.append(
            f"| {name} | {int(row['count'])} | {row['slot0_iou']:.4f} | {row['slot1_iou']:.4f} "
            f"| {row.get('empty_slot_clean', float('nan')):.2%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return train_command(
        argv,
        prog="hypersd-train segmentation",
        description="Train the Shapes instance-segmentation model (the structure-loss network).",
        config_type=SegmentationConfig,
        train=train,
        save=save_segmentation_model,
        format_metrics=format_metrics,
    )


if __name__ == "__main__":
    raise SystemExit(main())
