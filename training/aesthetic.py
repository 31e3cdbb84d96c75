"""The Shapes aesthetic model: a scalar "how clean does this image look" score.

The LAION-aesthetic analogue for the Shapes world, used as a ReFL reward in
human-feedback learning (Hyper-SD §3.2). A clean render of the world scores
about 1; the same render degraded scores lower, the more so the stronger the
degradation (about 0 at the strongest level trained). The degradations are
what a weak generator does to an image:

* ``blur`` -- gaussian blur, sigma 0.5 .. 2 px;
* ``noise`` -- additive gaussian noise, std 0.02 .. 0.15;
* ``ghost`` -- smearing: blended with a copy shifted by 2 .. 8 px (weight 0.2 .. 0.5);
* ``wash`` -- colour-washed: desaturated and hazed towards a pale colour;
* ``blocky`` -- pixelated into 2 .. 6 px blocks;
* ``jpeg`` -- JPEG compression at quality 50 .. 5.

Each takes a severity in [0, 1] (0 is already visibly degraded). Training
mixes a regression to a target score (1 for clean, ``0.7 (1 - severity)``
for degraded) with pairwise logistic ranking losses (clean above degraded,
milder above stronger degradation of the same image), on fresh renders.

The score is differentiable in the image, so ``AestheticNet.reward`` plugs into
``training.objectives.feedback.refl_loss`` as ``reward_fn(images, captions)``
(the captions are ignored).

``hypersd-train aesthetic [--config training/configs/aesthetic.yaml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hypersd.shapes import ShapesDataset
from hypersd.shapes.spec import CANVAS
from training.devices import resolve_device
from training.image_ops import gaussian_blur, images_to_tensor, jpeg_roundtrip
from training.netio import (
    SmallNetLoop,
    load_weights,
    read_config,
    save_network,
    train_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapes-aesthetic"

DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "ghost", "wash", "blocky", "jpeg")
# The severities reported (and tested): each must score below clean and below the previous.
LEVELS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# Target score of a degraded image: DEGRADED_TOP at severity 0, falling linearly to 0 at 1.
DEGRADED_TOP = 0.7


# ----------------------------------------------------------------------------- degradations


def degrade(
    images: Tensor, kind: str, severity: Tensor | float, generator: torch.Generator
) -> Tensor:
    """A degraded copy of (N, 3, H, W) [0, 1] images; ``severity`` in [0, 1], one or per image.

    Randomness (noise, shift direction, haze colour) comes from ``generator``
    (a CPU generator), so that evaluation sets are reproducible.
    """
    n, _, h, w = images.shape
    device = images.device
    s = torch.as_tensor(severity, dtype=images.dtype).expand(n).clone().clamp(0, 1).to(device)

    def draw(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    if kind == "blur":
        out = gaussian_blur(images, 0.5 + 1.5 * s, radius=6)
    elif kind == "noise":
        noise = torch.randn(images.shape, generator=generator).to(device)
        out = images + noise * (0.02 + 0.13 * s)[:, None, None, None]
    elif kind == "ghost":
        weight = (0.2 + 0.3 * s)[:, None, None, None]
        distance = 2 + torch.round(6 * s)
        angle = draw(n) * 2 * math.pi
        shifted = torch.stack(
            [
                torch.roll(image, (round(dy), round(dx)), dims=(1, 2))
                for image, dx, dy in zip(
                    images,
                    (distance * angle.cos()).tolist(),
                    (distance * angle.sin()).tolist(),
                    strict=True,
                )
            ]
        )
        out = (1 - weight) * images + weight * shifted
    elif kind == "wash":
        desaturate = (0.25 + 0.55 * s)[:, None, None, None]
        haze = (0.1 + 0.3 * s)[:, None, None, None]
        gray = images.mean(1, keepdim=True)
        pale = 0.55 + 0.4 * draw(n, 3)[:, :, None, None]
        out = (1 - desaturate) * images + desaturate * gray
        out = (1 - haze) * out + haze * pale
    elif kind == "blocky":
        blocks = (2 + torch.round(4 * s)).long().tolist()
        out = torch.stack(
            [
                F.interpolate(
                    F.interpolate(image[None], size=(h // b, w // b), mode="area"),
                    size=(h, w),
                    mode="nearest",
                )[0]
                for image, b in zip(images, blocks, strict=True)
            ]
        )
    elif kind == "jpeg":
        qualities = torch.round(50 - 45 * s).long().tolist()
        out = torch.stack(
            [jpeg_roundtrip(image, q) for image, q in zip(images, qualities, strict=True)]
        )
    else:
        raise ValueError(f"unknown degradation {kind!r}; allowed: {list(DEGRADATIONS)}")
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class AestheticNetConfig:
    """The architecture: conv blocks (channels, strides), global avg+max pooling, an MLP."""

    channels: tuple[int, ...] = (16, 32, 48, 64, 96)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    hidden_dim: int = 64

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("channels and strides must be non-empty and of the same length")


class AestheticNet(nn.Module):
    """A small CNN scoring (N, 3, 64, 64) [0, 1] images with one scalar each.

    Call ``net.eval()`` before scoring (``load_aesthetic_model`` returns it in
    eval mode with frozen parameters).
    """

    def __init__(self, config: AestheticNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AestheticNetConfig()
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
        self.head = nn.Sequential(
            nn.Linear(2 * in_channels, self.config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.config.hidden_dim, 1),
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        """(N,) scores: about 1 for clean renders, lower the more degraded."""
        features = self.body((images - 0.5) * 2.0)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)
        return self.head(pooled).squeeze(1)

    def reward(self, images: Tensor, captions: Sequence[Any] | None = None) -> Tensor:
        """ReFL reward ``r(images, captions) -> (N,)``, differentiable in the images.

        The captions are ignored (the score depends on the image only); images
        of another size are resized to 64 px (area filter, keeping the graph).
        """
        if images.shape[-2:] != (CANVAS, CANVAS):
            images = F.interpolate(images, size=(CANVAS, CANVAS), mode="area")
        return self(images)


# ----------------------------------------------------------------------------- save / load


def save_aesthetic_model(
    net: AestheticNet, directory: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, degradations, ``extra``)."""
    config = {
        "model_type": "shapes-aesthetic-net",
        "architecture": dataclasses.asdict(net.config),
        "degradations": list(DEGRADATIONS),
        "input": "RGB float (N, 3, 64, 64) in [0, 1]",
        "output": "(N,) score, ~1 for clean renders, lower when degraded",
        **(extra or {}),
    }
    return save_network(net, directory, config)


def load_aesthetic_model(
    directory: str | Path = DEFAULT_MODEL_DIR, device: torch.device | str | None = None
) -> AestheticNet:
    """Load a saved model in eval mode with frozen parameters; no pickle is involved."""
    config = read_config(directory, "shapes-aesthetic-net")
    arch = config["architecture"]
    net = AestheticNet(
        AestheticNetConfig(
            channels=tuple(arch["channels"]),
            strides=tuple(arch["strides"]),
            hidden_dim=int(arch["hidden_dim"]),
        )
    )
    return load_weights(net, directory, device)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class AestheticConfig:
    """Training config of the aesthetic model (saved into its config.json)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 48  # clean renders per step; each adds two degraded copies
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    rank_weight: float = 0.5  # weight of the pairwise ranking terms next to the regression
    rank_scale: float = 10.0  # logistic ranking: softplus(-scale * (better - worse - margin))
    rank_margin: float = 0.05
    # architecture
    channels: tuple[int, ...] = (16, 32, 48, 64, 96)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    hidden_dim: int = 64
    # evaluation on fresh renders (a dataset seed the training never uses)
    eval_size: int = 300
    eval_seed: int = 2_000_003
    # where and how
    out: str = "models/shapes-aesthetic"
    log_dir: str = "runs/aesthetic"
    device: str = "auto"
    num_threads: int = 1
    log_every: int = 50

    def net_config(self) -> AestheticNetConfig:
        return AestheticNetConfig(self.channels, self.strides, self.hidden_dim)


def render_images(dataset: ShapesDataset, start: int, count: int) -> Tensor:
    """(count, 3, 64, 64) [0, 1] renders of items ``start ..`` of ``dataset``."""
    return images_to_tensor([dataset[i].rendered.image for i in range(start, start + count)])


def training_loss(
    net: AestheticNet,
    clean: Tensor,
    generator: torch.Generator,
    config: AestheticConfig,
) -> Tensor:
    """Regression to the target scores plus pairwise logistic ranking, on one batch.

    Every clean image gets one degradation kind at two severities s1 < s2:
    clean > degraded(s1) > degraded(s2).
    """
    n = clean.shape[0]
    kinds = torch.randint(len(DEGRADATIONS), (n,), generator=generator)
    pair = torch.rand(n, 2, generator=generator).sort(dim=1).values
    mild, strong = torch.empty_like(clean), torch.empty_like(clean)
    for k, kind in enumerate(DEGRADATIONS):
        chosen = kinds == k
        if chosen.any():
            mild[chosen] = degrade(clean[chosen], kind, pair[chosen, 0], generator)
            strong[chosen] = degrade(clean[chosen], kind, pair[chosen, 1], generator)
    scores = net(torch.cat([clean, mild, strong]).to(net.device))
    s_clean, s_mild, s_strong = scores.split(n)
    severity = pair.to(net.device)
    targets = torch.cat(
        [torch.ones(n, device=net.device), DEGRADED_TOP * (1 - severity.T.reshape(-1))]
    )
    regression = F.mse_loss(scores, targets)

    def rank(better: Tensor, worse: Tensor, margin: float) -> Tensor:
        return F.softplus(-config.rank_scale * (better - worse - margin)).mean()

    ranking = (
        rank(s_clean, s_mild, config.rank_margin)
        + rank(s_mild, s_strong, config.rank_margin * (pair[:, 1] - pair[:, 0]).mean().item())
    ) / 2
    return regression + config.rank_weight * ranking


@torch.no_grad()
def evaluate(
    net: AestheticNet, clean: Tensor, seed: int, levels: Sequence[float] = LEVELS
) -> dict[str, Any]:
    """Scores of clean renders and of every degradation at every level.

    Returns ``clean_mean``, and per degradation: the mean score per level,
    ``pairwise`` (share of images scored above their degraded copy, per level),
    and ``monotone`` (the mean score falls level after level).
    """
    was_training = net.training
    net.eval()
    generator = torch.Generator().manual_seed(seed)
    s_clean = net(clean.to(net.device)).cpu()
    result: dict[str, Any] = {"count": len(clean), "clean_mean": round(s_clean.mean().item(), 4)}
    for kind in DEGRADATIONS:
        means, pairwise = [], []
        for level in levels:
            scores = net(degrade(clean, kind, level, generator).to(net.device)).cpu()
            means.append(round(scores.mean().item(), 4))
            pairwise.append(round((s_clean > scores).float().mean().item(), 4))
        result[kind] = {
            "levels": list(levels),
            "mean": means,
            "pairwise": pairwise,
            "monotone": all(a > b for a, b in itertools.pairwise(means)),
        }
    net.train(was_training)
    return result


def train(config: AestheticConfig) -> tuple[AestheticNet, dict[str, Any]]:
    """Train on fresh renders, evaluate on held-out ones; return the net and its metrics."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    net = AestheticNet(config.net_config()).to(device)
    dataset = ShapesDataset(config.seed, config.steps * config.batch_size)
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
        desc="aesthetic",
    ) as loop:
        for step in loop:
            clean = render_images(dataset, step * config.batch_size, config.batch_size)
            loop.update(step, training_loss(net, clean, generator, config))
    train_seconds = loop.seconds
    net.eval()
    held_out = render_images(ShapesDataset(config.eval_seed, config.eval_size), 0, config.eval_size)
    metrics: dict[str, Any] = {
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "eval": evaluate(net, held_out, config.eval_seed),
    }
    return net, metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """Held-out results as a markdown table: mean score and pairwise accuracy per level."""
    result = metrics["eval"]
    levels = result[DEGRADATIONS[0]]["levels"]
    header = " | ".join(f"s={level:g}" for level in levels)
    lines = [
        f"clean renders: {result['count']}, mean score {result['clean_mean']:.3f}",
        f"| degradation | mean score {header} | clean > degraded {header} | monotone |",
        "|---" * (2 * len(levels) + 2) + "|",
    ]
    for kind in DEGRADATIONS:
        row = result[kind]
        means = " | ".join(f"{m:.3f}" for m in row["mean"])
        pairs = " | ".join(f"{p:.1%}" for p in row["pairwise"])
        lines.append(f"| {kind} | {means} | {pairs} | {row['monotone']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return train_command(
        argv,
        prog="hypersd-train aesthetic",
        description="Train the Shapes aesthetic model (a ReFL reward: clean above degraded).",
        config_type=AestheticConfig,
        train=train,
        save=save_aesthetic_model,
        format_metrics=format_metrics,
    )


if __name__ == "__main__":
    raise SystemExit(main())
