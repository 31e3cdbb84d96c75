"""The Shapes renderer: scene -> 64x64 RGB image (and per-object masks), per shapes-world.md."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from hypersd.shapes.captions import Scene, ShapeObject
from hypersd.shapes.spec import (
    ANCHOR_JITTER,
    BACKGROUND_COLORS,
    CANVAS,
    EDGE_MARGIN,
    GRADIENT_BOTTOM_BRIGHTNESS,
    OBJECT_COLORS,
    OBJECT_GAP,
    SIZE_JITTER,
    SIZES,
    SLOTS,
    STYLES,
    SUPERSAMPLE,
)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one object is drawn: the centre of its box and the box side (extent), in pixels."""

    center_x: int
    center_y: int
    extent: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in continuous canvas coordinates."""
        half = self.extent / 2
        return (
            self.center_x - half,
            self.center_y - half,
            self.center_x + half,
            self.center_y + half,
        )


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered scene: the image (H, W, 3) uint8, one coverage mask (H, W) float per object."""

    image: np.ndarray
    coverage: tuple[np.ndarray, ...]
    placements: tuple[Placement, ...]

    def masks(self, threshold: float = 0.5) -> np.ndarray:
        """Boolean instance masks, (objects, H, W): pixels at least ``threshold`` covered."""
        return np.stack([c >= threshold for c in self.coverage])


def _box_gap(a: Placement, b: Placement) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def _inside_margin(p: Placement) -> bool:
    x0, y0, x1, y1 = p.box
    return min(x0, y0) >= EDGE_MARGIN and max(x1, y1) <= CANVAS - EDGE_MARGIN


def place_objects(objects: tuple[ShapeObject, ...], rng: random.Random) -> tuple[Placement, ...]:
    """Jitter each object's size (±1 px) and anchor (±2 px per axis) within the spec's margins.

    Draws are repeated until the boxes keep the edge margin and the gap between
    objects (two large objects at the extremes of their jitter could touch).
    """
    while True:
        placements = []
        for obj in objects:
            anchor_x, anchor_y = SLOTS[obj.slot]
            placements.append(
                Placement(
                    anchor_x + rng.randint(-ANCHOR_JITTER, ANCHOR_JITTER),
                    anchor_y + rng.randint(-ANCHOR_JITTER, ANCHOR_JITTER),
                    SIZES[obj.size] + rng.randint(-SIZE_JITTER, SIZE_JITTER),
                )
            )
        if all(map(_inside_margin, placements)) and (
            len(placements) == 1 or _box_gap(placements[0], placements[1]) >= OBJECT_GAP
        ):
            return tuple(placements)


def _shape_mask(shape: str, placement: Placement) -> np.ndarray:
    """Coverage in [0, 1] of one shape on the canvas: drawn at 4x, box-downsampled."""
    s = SUPERSAMPLE
    big = Image.new("L", (CANVAS * s, CANVAS * s), 0)
    draw = ImageDraw.Draw(big)
    x0, y0, x1, y1 = (round(v * s) for v in placement.box)
    cx, cy = placement.center_x * s, placement.center_y * s
    # PIL fills both end coordinates; a box [x0, x1) covers supersampled pixels x0 .. x1 - 1.
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=255)
    elif shape == "cross":
        half_bar = round(placement.extent / 3) * s // 2
        draw.rectangle((x0, cy - half_bar, x1 - 1, cy + half_bar - 1), fill=255)
        draw.rectangle((cx - half_bar, y0, cx + half_bar - 1, y1 - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = big.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _fill(obj: ShapeObject, placement: Placement, style: str) -> np.ndarray:
    """The object's colour per pixel, (H, W, 3) float: flat, or the vertical gradient style."""
    color = np.asarray(OBJECT_COLORS[obj.color], dtype=np.float32)
    if style == "flat":
        return np.broadcast_to(color, (CANVAS, CANVAS, 3))
    _, top, _, bottom = placement.box
    row_centres = np.arange(CANVAS, dtype=np.float32) + 0.5
    progress = np.clip((row_centres - top) / (bottom - top), 0.0, 1.0)
    brightness = 1.0 - (1.0 - GRADIENT_BOTTOM_BRIGHTNESS) * progress
    return np.broadcast_to(brightness[:, None, None] * color, (CANVAS, CANVAS, 3))


def render(
    scene: Scene,
    rng: random.Random | None = None,
    *,
    style: str = "flat",
    placements: tuple[Placement, ...] | None = None,
) -> Rendered:
    """Render ``scene``; jitter comes from ``rng`` unless ``placements`` are given.

    Args:
        scene: the background and objects to draw.
        rng: source of the size and anchor jitter (a fresh unseeded one when None).
        style: ``flat`` (the base world) or ``gradient`` (the style variant).
        placements: explicit placements, one per object, instead of jitter.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    if placements is None:
        placements = place_objects(scene.objects, rng or random.Random())
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_COLORS[scene.background]
    coverage = []
    for obj, placement in zip(scene.objects, placements, strict=True):
        alpha = _shape_mask(obj.shape, placement)
        canvas = canvas * (1.0 - alpha[..., None]) + _fill(obj, placement, style) * alpha[..., None]
        coverage.append(alpha)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Rendered(image, tuple(coverage), placements)
