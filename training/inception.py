"""FID's Inception-v3 feature extractor (TensorFlow's 2015-12-05 graph), loaded from safetensors.

The network of pytorch-fid's ``FIDInceptionA/C/E`` and torch-fidelity's
``FeatureExtractorInceptionV3`` (the "pt_inception-2015-12-05" weights, converted from the
TensorFlow graph that published FIDs use): torchvision's Inception-v3 with TensorFlow's
differences, i.e. the A, C and first E blocks' 3x3 average pools leave the zero padding out of
their averages, and the last E block max-pools. Images (uint8 RGB, any size) are resized to
299 x 299 with TensorFlow 1.x's bilinear resize (no half-pixel offset, as the graph's own
``ResizeBilinear``), scaled to [-1, 1], and the 2048 channels of the last block are averaged
over space: FID's features. The 1008-way classifier (Inception Score's) is not built.

The released weights are a pickle (``weights-inception-2015-12-05-6726825d.pth``, torch-fidelity's
release; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is the same file).
``hypersd-train convert-inception`` reads it once with ``torch.load(..., weights_only=True)``
(tensors only, no code) and writes the feature extractor's weights as safetensors, under the same
parameter names; evaluation loads only that file (``InceptionFeatures``)::

    hypersd-train convert-inception --checkpoint weights-inception-2015-12-05-6726825d.pth \\
        --out models/inception-2015-12-05.safetensors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

SIZE = 299  # the graph's input side
FEATURES = 2048  # the pool features' width


class ConvBN(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3, the graph's), ReLU: every layer's unit.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: the kernel's size, an int or (height, width).
        stride: the convolution's stride.
        padding: zero padding, an int or (height, width).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn(conv(x)))``."""
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 average pool: the zero padding is not counted in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b-5d (35 x 35): 1x1, 5x5, double 3x3 and pooled branches.

    Args:
        cin: input channels.
        pool: the pooled branch's channels.
    """

    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The branches concatenated over channels."""
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                double,
                self.branch_pool(_pool_3x3(x)),
            ],
            1,
        )


class BlockB(nn.Module):
    """Mixed_6a: 35 -> 17 by strided 3x3 convolutions and a max pool.

    Args:
        cin: input channels.
    """

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """The branches concatenated over channels."""
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b-6e (17 x 17): factorised 7x7 branches.

    Args:
        cin: input channels.
        c7: the 7x7 branches' inner channels.
    """

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The branches concatenated over channels."""
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_pool_3x3(x))], 1)


class BlockD(nn.Module):
    """Mixed_7a: 17 -> 8 by strided convolutions and a max pool.

    Args:
        cin: input channels.
    """

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """The branches concatenated over channels."""
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        three = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([three, seven, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b and 7c (8 x 8): split 1x3 / 3x1 branches; the graph's 7b average-pools its
    pooled branch (padding left out), its 7c max-pools it.

    Args:
        cin: input channels.
        pool: the pooled branch's pooling: avg (Mixed_7b) or max (Mixed_7c).
    """

    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be one of avg, max; got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The branches concatenated over channels."""
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


def resize_like_tensorflow(images: Tensor, size: int = SIZE) -> Tensor:
    """TensorFlow 1.x's bilinear resize (``align_corners=False``, no half-pixel offset): output
    pixel i samples the input at ``i * in / out``, clamped at the last pixel.

    Args:
        images: ``(N, C, H, W)`` float images.
        size: the output's side.
    """
    out = images
    for axis in (3, 2):  # width, then height: the graph's order, for the same rounding
        length = out.shape[axis]
        position = torch.arange(size, dtype=torch.float32, device=images.device)
        position = position * torch.tensor(length / size, dtype=torch.float32)
        low = position.long()
        high = (low + 1).clamp_max(length - 1)
        shape = [1, 1, 1, 1]
        shape[axis] = size
        fraction = (position - low.float()).view(shape).to(images.dtype)
        below, above = out.index_select(axis, low), out.index_select(axis, high)
        out = below + (above - below) * fraction
    return out


class InceptionV3(nn.Module):
    """FID's Inception-v3 up to its 2048-d pool features (torch-fidelity's parameter names)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool=32)
        self.Mixed_5c = BlockA(256, pool=64)
        self.Mixed_5d = BlockA(288, pool=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 2048)`` pool features of ``(N, 3, H, W)`` images with values in [0, 255]."""
        x = (resize_like_tensorflow(images.float()) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))


class InceptionFeatures:
    """FID's Inception-v3 pool features of images (``convert-inception``'s safetensors).

    Args:
        path: the converted weights (``.safetensors``).
        device: where to run it.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        model = InceptionV3()
        model.load_state_dict(load_file(str(path)))
        self.model = model.requires_grad_(False).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """``(N, 2048)`` float64 features of the PIL images (any sizes: each is resized)."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.cat(
                [
                    # resized one by one to stack images of different sizes; the model's own
                    # resize of a 299 x 299 image is then the identity (every weight 0)
                    resize_like_tensorflow(uint8_pixels(image)[None].to(self.device))
                    for image in images[start : start + batch_size]
                ]
            )
            out.append(self.model(pixels).double().cpu().numpy())
        return np.concatenate(out)


def uint8_pixels(image: Image.Image) -> Tensor:
    """A PIL image's RGB values as a ``(3, H, W)`` float tensor in [0, 255]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def convert_inception(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the feature extractor's weights of a released Inception ``.pth`` as safetensors.

    Reads ``checkpoint`` once with ``torch.load(..., weights_only=True)`` (tensors only). Its
    classifier (``fc.*``, Inception Score's logits) is dropped, and batch norms' missing
    ``num_batches_tracked`` counters (unused in evaluation) are filled in; any other missing or
    unknown parameter is an error.

    Args:
        checkpoint: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or
            pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, the same weights).
        out: the ``.safetensors`` file to write.
    """
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    model = InceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: not FID's Inception-v3; missing {missing[:5]}, unknown {unexpected[:5]}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``hypersd-train convert-inception``: the released Inception weights to safetensors."""
    parser = argparse.ArgumentParser(
        prog="hypersd-train convert-inception",
        description="Convert FID's Inception-v3 weights (.pth) to safetensors, once.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="weights-inception-2015-12-05-6726825d.pth"
    )
    parser.add_argument(
        "--out", default="models/inception-2015-12-05.safetensors", help="file to write"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    print(f"wrote {convert_inception(args.checkpoint, args.out)}")
    return 0
