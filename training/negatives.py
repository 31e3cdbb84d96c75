"""The attribute network's training renders, some of them negatives that no caption describes.

A negative is a render with one extra object drawn (clutter, of a size no object
has) or with one object redrawn as an off-vocabulary shape (an odd shape); both are
labelled ``extra = yes``, so the network learns that an image is correct only when
nothing else is drawn.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from hypersd.shapes import Placement, Scene, ShapeObject, ShapesDataset, ShapesSample, render
from hypersd.shapes.spec import BACKGROUND_COLORS, CANVAS, OBJECT_COLORS, SUPERSAMPLE
from training.scene_labels import COLORS, HEAD_NAMES, HEADS, IGNORE, SHAPE_NAMES, scene_labels

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
