"""A geometric judge of Shapes images: no network, nothing learned, nothing shared with training.

The attribute network (``training.attributes``) that the table's adherence comes from is a
sibling of the alignment reward that the feedback and DMD stages optimise, so it cannot see
what those rewards taught the models to get away with. This judge reads an image with the
world's own geometry (``shared/shapes-world.md``, ``hypersd.shapes.spec``) instead:

1. **Background**: the median colour of the 4 px border ring (no object pixel is ever
   there), named by the nearest background colour of the palette.
2. **Unmixing**: every pixel is explained as ``(1 - a) * background + a * colour`` for each
   object colour of the palette; the colour with the smallest residual names the pixel and
   its ``a`` (coverage, 0..1) says how much of it is object. Anti-aliased and blurred edges
   are such mixtures, so they get fractional coverage instead of a wrong colour.
3. **Objects**: connected components (8-connected) of pixels at least half covered;
   components under ``MIN_OBJECT_AREA`` pixels of coverage are specks, not objects.
4. Per object, **colour**: the coverage-weighted majority of its pixels' colour names (the
   spec: "its pixels nearest to that palette colour"); **shape, size and place**: the best
   soft-IoU match of its coverage against the renderer's own templates (each shape drawn
   at each extent, the box centred at each candidate anchor). The best template's shape is
   the shape, its extent the size (within ``SIZE_TOLERANCE`` of 12 or 22 px), its box centre
   the anchor, whose nearest slot (within ``PLACE_TOLERANCE`` per axis) is the place.
5. **Count**: exactly as many objects as the caption names ("nothing else is drawn").

Two-object captions are judged under both pairings of objects to components and the pairing
with fewer failures is kept, so swapped objects fail ``place`` rather than everything.
When the count is wrong nothing else about the objects is judged (``count`` fails alone).

The templates come from ``hypersd.shapes.render`` (the world's spec), not from data; no
training stage or reward imports this module. Calibration: ``tests/test_geometric_judge.py``
and ``python -m training.geometric_judge`` (prints acceptance of clean, mildly degraded and
one-attribute-off renders).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from itertools import permutations
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from hypersd.shapes import Placement, Scene, ShapeObject, parse_caption, render, sample_scene
from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    CANVAS,
    EDGE_MARGIN,
    OBJECT_COLORS,
    SHAPES,
    SIZES,
    SLOTS,
)

# Bumped whenever a change to the judge can change a verdict: cached measurements made with
# another version are measured again (training.table).
JUDGE_VERSION = 1
# The attributes a verdict can fail, in report order.
JUDGED_ATTRIBUTES = ("background", "count", "color", "shape", "size", "place")
COLOR_NAMES = tuple(OBJECT_COLORS)
_PALETTE = np.array([OBJECT_COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (7, 3)
_BACKGROUNDS = {name: np.array(rgb, np.float32) for name, rgb in BACKGROUND_COLORS.items()}

MIN_OBJECT_AREA = 10.0  # px of coverage; the smallest object (a small cross) covers ~60
RIM_WIDTH = 2.5  # px around an object's half-covered pixels that still count as its edge
# A shape is read only when its template fits well and clearly better than any other
# shape's: a blob halfway between a square and a circle is neither. Calibrated on renders
# (clean: fit 1, margin >= 0.16; blur 1 px + noise 10: fit >= 0.83, margin >= 0.05; a small
# square blurred by 2 px: margin 0.005) and `python -m training.geometric_judge`.
MIN_SHAPE_IOU = 0.75
MIN_SHAPE_MARGIN = 0.03
# Template blurs (px): the judge reads shapes, not sharpness, so a shape softened as by a
# decoder (up to ~1 px) is matched against its own softened template; a blob softer than
# that, or rounded beyond it, fits no shape clearly.
TEMPLATE_BLURS = (0.0, 0.5, 1.0)
SIZE_TOLERANCE = 3  # px of extent around 12 / 22: the ±1 px jitter plus 2 px of slack
PLACE_TOLERANCE = 6  # px per axis from the slot: ±2 px jitter, and < half the 14 px spacing
# Template search around the component's own box estimate: extent ± 2 px, centre ± 1 px.
_EXTENT_SEARCH = np.arange(-2, 3)
_CENTRE_SEARCH = np.arange(-1, 2)
_WINDOW = 48  # px: the templates' canvas, the largest extent (34) with its rim and search
_MIN_EXTENT, _MAX_EXTENT = 4, 34


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's reading of one image against one caption.

    ``failed`` lists the attributes (from ``JUDGED_ATTRIBUTES``) that do not hold; the image
    is correct when it is empty. ``found`` is what the judge saw, one entry per object.
    """

    failed: tuple[str, ...]
    background: str
    found: tuple[ShapeObject | None, ...]

    @property
    def correct(self) -> bool:
        return not self.failed


@dataclass(frozen=True, slots=True)
class Component:
    """One object as the judge reads it, before it is compared with a caption."""

    color: str
    shape: str | None  # None: no shape fits clearly (see MIN_SHAPE_IOU, MIN_SHAPE_MARGIN)
    extent: int
    center: tuple[int, int]  # (x, y) of the best template's box centre
    fit: float  # the best template's soft IoU
    margin: float  # how much better it fits than the best template of another shape

    def reading(self) -> ShapeObject | None:
        size, slot = _size_name(self.extent), _slot_name(self.center)
        if self.shape is None or size is None or slot is None:
            return None
        return ShapeObject(size, self.color, self.shape, slot)


def _size_name(extent: int) -> str | None:
    return next((n for n, e in SIZES.items() if abs(extent - e) <= SIZE_TOLERANCE), None)


def _slot_name(center: tuple[int, int]) -> str | None:
    for name, (x, y) in SLOTS.items():
        if max(abs(center[0] - x), abs(center[1] - y)) <= PLACE_TOLERANCE:
            return name
    return None


@cache
def _templates() -> np.ndarray:
    """Coverage of every shape at every extent, box centred at (32, 32), sharp and blurred by
    each of ``TEMPLATE_BLURS``: (shapes, extents, blurs, H, W).

    Drawn by the world's renderer itself. Centres and extents are whole pixels, which the
    renderer maps to whole supersampled pixels, so a template shifted by whole pixels is
    exactly the render at the shifted anchor.
    """
    out = np.zeros((len(SHAPES), _MAX_EXTENT + 1, len(TEMPLATE_BLURS), CANVAS, CANVAS), np.float32)
    for s, shape in enumerate(SHAPES):
        scene = Scene("black", (ShapeObject("small", "red", shape, "center"),))
        for extent in range(_MIN_EXTENT, _MAX_EXTENT + 1):
            sharp = render(scene, placements=(Placement(32, 32, extent),)).coverage[0]
            for b, blur in enumerate(TEMPLATE_BLURS):
                out[s, extent, b] = ndimage.gaussian_filter(sharp, blur) if blur else sharp
    lo = CANVAS // 2 - _WINDOW // 2
    return out[..., lo : lo + _WINDOW, lo : lo + _WINDOW]


def unmix(image: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index of the palette colour that best explains it and its coverage.

    Each pixel ``p`` is projected onto the segment from ``background`` to each palette
    colour ``c``: ``a = clip(<p - bg, c - bg> / |c - bg|^2, 0, 1)``; the colour with the
    smallest residual ``|p - bg - a (c - bg)|`` wins. Returns (H, W) int and (H, W) float.
    """
    offset = image.astype(np.float32) - background  # (H, W, 3)
    directions = _PALETTE - background  # (7, 3)
    norms = np.maximum((directions**2).sum(1), 1.0)
    dots = offset @ directions.T  # (H, W, 7)
    alpha = np.clip(dots / norms, 0.0, 1.0)
    # |p - a d|^2 without the |p|^2 every colour shares: a^2 |d|^2 - 2 a <p, d>
    residual = alpha * (alpha * norms - 2 * dots)
    best = residual.argmin(-1)
    return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def _read_component(own: np.ndarray, names: np.ndarray, mask: np.ndarray) -> Component:
    """Colour by weighted vote; shape, extent and anchor by the best template match.

    ``mask``: the component's pixels (at least half covered); ``own``: the coverage of
    those pixels and of their anti-aliased rim, zero elsewhere.
    """
    votes = np.bincount(names[mask], weights=own[mask], minlength=len(COLOR_NAMES))
    color = COLOR_NAMES[int(votes.argmax())]
    rows, cols = np.nonzero(mask)
    cy, cx = round((rows.min() + rows.max()) / 2), round((cols.min() + cols.max()) / 2)
    extent0 = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    extents = np.clip(extent0 + _EXTENT_SEARCH, _MIN_EXTENT, _MAX_EXTENT)
    # Compare within a window that holds the object, its rim and the centre search, and no
    # more (the comparison's cost grows with the window's area).
    half = (int(extents.max()) + 1) // 2 + 4
    padded = np.pad(own, half + 1)
    centres = [(cx + dx, cy + dy) for dy in _CENTRE_SEARCH for dx in _CENTRE_SEARCH]
    crops = np.stack(
        [padded[y + 1 : y + 2 * half + 1, x + 1 : x + 2 * half + 1] for x, y in centres]
    )  # (centres, W, W)
    lo = _WINDOW // 2 - half
    templates = _templates()[:, extents, :, lo : lo + 2 * half, lo : lo + 2 * half]
    # Soft IoU, sum(min) / sum(max), from one pass: min + max = a + b, max - min = |a - b|.
    total = crops.sum((-1, -2))[None, None, None] + templates.sum((-1, -2))[..., None]
    difference = np.abs(crops[None, None, None] - templates[:, :, :, None]).sum((-1, -2))
    # (shapes, extents, blurs, centres)
    iou = (total - difference) / np.maximum(total + difference, 1e-6)
    s, e, _, c = np.unravel_index(int(iou.argmax()), iou.shape)
    per_shape = np.sort(iou.max((1, 2, 3)))
    fit, margin = float(per_shape[-1]), float(per_shape[-1] - per_shape[-2])
    clear = fit >= MIN_SHAPE_IOU and margin >= MIN_SHAPE_MARGIN
    return Component(color, SHAPES[s] if clear else None, int(extents[e]), centres[c], fit, margin)


def _failures(expected: ShapeObject, found: Component) -> list[str]:
    failed = []
    if found.color != expected.color:
        failed.append("color")
    if found.shape != expected.shape:
        failed.append("shape")
    if _size_name(found.extent) != expected.size:
        failed.append("size")
    if _slot_name(found.center) != expected.slot:
        failed.append("place")
    return failed


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(64, 64, 3) uint8; an image generated at another size is box-filtered to the canvas,
    as the world's renderer downsamples (``--size`` in ``hypersd-train evaluate``)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    if pil.size != (CANVAS, CANVAS):
        pil = pil.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return np.asarray(pil)


@dataclass(frozen=True, slots=True)
class Reading:
    """What an image shows, caption aside: its background and its objects."""

    background: str
    components: tuple[Component, ...]


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read the background and the objects of ``image`` (see the module docstring)."""
    array = _as_array(image)
    ring = np.ones((CANVAS, CANVAS), bool)
    ring[EDGE_MARGIN:-EDGE_MARGIN, EDGE_MARGIN:-EDGE_MARGIN] = False
    background_rgb = np.median(array[ring].astype(np.float32), axis=0)
    background = min(
        _BACKGROUNDS, key=lambda n: float(((_BACKGROUNDS[n] - background_rgb) ** 2).sum())
    )
    names, coverage = unmix(array, background_rgb)
    labels, count = ndimage.label(coverage >= 0.5, structure=np.ones((3, 3), bool))
    areas = np.atleast_1d(ndimage.sum(coverage, labels, index=np.arange(1, count + 1)))
    masks = [labels == i + 1 for i, area in enumerate(areas) if area >= MIN_OBJECT_AREA]
    if not masks:
        return Reading(background, ())
    # Each pixel within RIM_WIDTH of an object belongs to the nearest one: the object's rim
    # of partly covered pixels counts for its shape, the other object's never does.
    objects = np.zeros(labels.shape, np.int32)
    for i, m in enumerate(masks):
        objects[m] = i + 1
    distance, (near_y, near_x) = ndimage.distance_transform_edt(objects == 0, return_indices=True)
    nearest = np.where(distance <= RIM_WIDTH, objects[near_y, near_x], 0)
    components = tuple(
        _read_component(np.where(nearest == i + 1, coverage, 0.0), names, m)
        for i, m in enumerate(masks)
    )
    return Reading(background, components)


def verdict(reading: Reading, scene: Scene) -> Verdict:
    """Compare what an image shows with ``scene``: which attributes fail."""
    failed: set[str] = set() if reading.background == scene.background else {"background"}
    components = reading.components
    if len(components) != len(scene.objects):
        failed.add("count")
        return Verdict(_ordered(failed), reading.background, ())
    # Keep the pairing of caption objects to components with the fewest failures.
    orders = list(permutations(range(len(components))))
    pairings = [
        [_failures(obj, components[i]) for obj, i in zip(scene.objects, order, strict=True)]
        for order in orders
    ]
    best = min(range(len(orders)), key=lambda k: sum(map(len, pairings[k])))
    for object_failures in pairings[best]:
        failed.update(object_failures)
    found = tuple(components[i].reading() for i in orders[best])
    return Verdict(_ordered(failed), reading.background, found)


def judge(image: Image.Image | np.ndarray, caption: str | Scene) -> Verdict:
    """Whether ``image`` shows ``caption``'s scene, and which attributes fail if not."""
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    return verdict(read_image(image), scene)


def _ordered(failed: set[str]) -> tuple[str, ...]:
    return tuple(a for a in JUDGED_ATTRIBUTES if a in failed)


def judge_images(
    images: Sequence[Image.Image | np.ndarray], captions: Sequence[str]
) -> list[Verdict]:
    """``judge`` each image against its caption."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    return [judge(i, c) for i, c in zip(images, captions, strict=True)]


def summarize(verdicts: Sequence[Verdict], captions: Sequence[str]) -> dict[str, Any]:
    """Adherence by the judge and failure counts per attribute, for ``all`` and each kind.

    Returns ``{"version": JUDGE_VERSION, "adherence": {group: share correct},
    "failures": {group: {attribute: images failing it}}}``; groups are ``all``, ``one``
    and ``two`` (a kind with no captions is left out). An image can fail several
    attributes, so failures can add up to more than the wrong images.
    """
    if len(verdicts) != len(captions):
        raise ValueError(f"{len(verdicts)} verdicts for {len(captions)} captions")
    if not captions:
        raise ValueError("no verdicts to summarize")
    kinds = [parse_caption(c).kind for c in captions]
    adherence: dict[str, float] = {}
    failures: dict[str, dict[str, int]] = {}
    for group in ("all", "one", "two"):
        chosen = [v for v, k in zip(verdicts, kinds, strict=True) if group in ("all", k)]
        if not chosen:
            continue
        adherence[group] = sum(v.correct for v in chosen) / len(chosen)
        failures[group] = {a: sum(a in v.failed for v in chosen) for a in JUDGED_ATTRIBUTES}
    return {"version": JUDGE_VERSION, "adherence": adherence, "failures": failures}


# ----------------------------------------------------------------------------- calibration

# "Mild" degradation: a Gaussian blur of MILD_BLUR px and Gaussian noise of MILD_NOISE grey
# levels (of 255). Why these: a 1 px blur is what a decoder's softness looks like on a 64 px
# canvas (edges spread over ~2-3 px instead of the renderer's 1) while the 2 px gap between
# two objects stays open (each edge adds ~16 % coverage midway) and a 12 px square is still
# plainly a square; 8 grey levels (~3 % of the range) is grain a person barely notices and
# well below the weakest object/background contrast (purple on gray, ~100 levels).
# Harder levels are reported, not required: `python -m training.geometric_judge 500 1.3 15`.
MILD_BLUR = 1.0
MILD_NOISE = 8.0
ALTERED = ("background", "color", "shape", "size", "place")


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    """``image`` blurred (Gaussian, ``blur`` px std per axis) then noised (``noise`` std)."""
    out = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur, blur, 0))
    out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def one_attribute_off(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """A valid scene that differs from ``scene`` in ``attribute`` only (one object of two).

    ``place`` of a two-object scene: the other relation (left/right <-> top/bottom) or,
    by coin flip, the two objects swapped (same relation, other order).
    """
    objects = list(scene.objects)
    if attribute == "background":
        others = [b for b in BACKGROUND_COLORS if b != scene.background]
        return Scene(rng.choice(others), scene.objects)
    if attribute == "place":
        if len(objects) == 1:
            others = [s for s in SLOTS if s != objects[0].slot]
            return Scene(scene.background, (replace(objects[0], slot=rng.choice(others)),))
        first, second = objects
        if rng.random() < 0.5:
            slots = ("top", "bottom") if first.slot == "left" else ("left", "right")
            return Scene(
                scene.background, (replace(first, slot=slots[0]), replace(second, slot=slots[1]))
            )
        return Scene(
            scene.background, (replace(second, slot=first.slot), replace(first, slot=second.slot))
        )
    choices = {"color": COLOR_NAMES, "shape": SHAPES, "size": tuple(SIZES)}[attribute]
    while True:
        i = rng.randrange(len(objects))
        value = rng.choice([v for v in choices if v != getattr(objects[i], attribute)])
        changed = list(objects)
        changed[i] = replace(objects[i], **{attribute: value})
        try:
            return Scene(scene.background, tuple(changed))
        except ValueError:  # the two objects now share colour and shape: draw again
            continue


@dataclass(frozen=True, slots=True)
class Calibration:
    """Acceptance rates of the judge on renders (see ``calibrate``)."""

    count: int
    blur: float
    noise: float
    clean: float
    mild: float
    off: dict[str, float]  # altered attribute -> share of images accepted against it

    def lines(self) -> list[str]:
        out = [
            f"renders: {self.count} (half one-object, half two-object scenes)",
            f"clean renders accepted: {self.clean:.2%}",
            f"degraded (blur {self.blur:g} px, noise {self.noise:g}) accepted: {self.mild:.2%}",
        ]
        out += [f"accepted against a caption with {a} off: {v:.2%}" for a, v in self.off.items()]
        return out


def calibrate(
    count: int = 500, seed: int = 0, *, blur: float = MILD_BLUR, noise: float = MILD_NOISE
) -> Calibration:
    """Judge ``count`` fresh renders clean, degraded (``blur``, ``noise``: see ``degrade``),
    and against captions with one attribute off (each attribute kind, every render; the
    clean render is judged). Deterministic for ``seed``."""
    rng = random.Random(f"geometric-judge:{seed}")
    noise_rng = np.random.default_rng(seed)
    clean = mild = 0
    off = dict.fromkeys(ALTERED, 0)
    for i in range(count):
        scene = sample_scene(rng, "one" if i % 2 == 0 else "two")
        image = render(scene, rng).image
        reading = read_image(image)
        clean += verdict(reading, scene).correct
        mild += judge(degrade(image, noise_rng, blur, noise), scene).correct
        for attribute in ALTERED:
            off[attribute] += verdict(reading, one_attribute_off(scene, attribute, rng)).correct
    return Calibration(
        count, blur, noise, clean / count, mild / count, {a: n / count for a, n in off.items()}
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.geometric_judge [COUNT [BLUR NOISE]]``: print the calibration."""
    args = list(sys.argv[1:] if argv is None else argv)
    count = int(args[0]) if args else 500
    blur, noise = (float(args[1]), float(args[2])) if len(args) >= 3 else (MILD_BLUR, MILD_NOISE)
    print("\n".join(calibrate(count, blur=blur, noise=noise).lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
