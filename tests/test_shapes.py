"""Properties of the Shapes world: the caption grammar, the renderer and the dataset.

Every measure of the project reads images and captions through these rules
(shared/shapes-world.md), so they are checked as properties over all scenes,
not on a handful of examples.
"""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hypersd.shapes import (
    Placement,
    Scene,
    ShapeObject,
    ShapesDataset,
    fixed_captions,
    is_caption,
    parse_caption,
    render,
    sample_scene,
    scene_to_caption,
)
from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    CANVAS,
    EDGE_MARGIN,
    GRADIENT_BOTTOM_BRIGHTNESS,
    OBJECT_COLORS,
    OBJECT_GAP,
    RELATIONS,
    SHAPES,
    SIZES,
    SLOTS,
)

FAST = settings(max_examples=150, deadline=None)
RENDERS = settings(max_examples=120, deadline=None)


def objects(slot: str) -> st.SearchStrategy[ShapeObject]:
    return st.builds(
        ShapeObject,
        size=st.sampled_from(sorted(SIZES)),
        color=st.sampled_from(sorted(OBJECT_COLORS)),
        shape=st.sampled_from(SHAPES),
        slot=st.just(slot),
    )


@st.composite
def scenes(draw: st.DrawFn, kind: str | None = None) -> Scene:
    """Any valid scene: every background, slot, relation, colour, shape and size."""
    kind = kind or draw(st.sampled_from(("one", "two")))
    background = draw(st.sampled_from(sorted(BACKGROUND_COLORS)))
    if kind == "one":
        return Scene(background, (draw(objects(draw(st.sampled_from(sorted(SLOTS))))),))
    first_slot, second_slot = draw(st.sampled_from(sorted(RELATIONS.values())))
    first = draw(objects(first_slot))
    second = draw(objects(second_slot))
    assume((first.color, first.shape) != (second.color, second.shape))
    return Scene(background, (first, second))


# ----------------------------------------------------------------------------- captions


@FAST
@given(scenes())
def test_scene_caption_round_trip(scene: Scene) -> None:
    caption = scene_to_caption(scene)
    assert caption == scene.caption()
    assert parse_caption(caption) == scene
    assert parse_caption(caption).caption() == caption
    assert is_caption(caption)


@FAST
@given(st.integers(0, 2**32), st.sampled_from(("one", "two", None)))
def test_sampled_caption_round_trip(seed: int, kind: str | None) -> None:
    scene = sample_scene(random.Random(seed), kind)
    if kind is not None:
        assert scene.kind == kind
    caption = scene.caption()
    assert parse_caption(caption) == scene
    assert parse_caption(caption).caption() == caption


@FAST
@given(scenes(), st.sampled_from(("  ", "\t", "\n ")))
def test_parse_normalises_whitespace_only(scene: Scene, space: str) -> None:
    """Extra whitespace is tolerated (prompts come from people); nothing else is."""
    caption = scene.caption()
    assert parse_caption(space + caption.replace(" ", space) + space) == scene


@FAST
@given(st.text(max_size=80))
def test_parse_rejects_arbitrary_text(text: str) -> None:
    if is_caption(text):  # astronomically unlikely, but then it must be a real caption
        assert parse_caption(text).caption() == " ".join(text.split())
        return
    with pytest.raises(ValueError):
        parse_caption(text)


def _mutations(caption: str) -> list[str]:
    words = caption.split()
    out = [
        caption.upper(),
        caption.capitalize(),
        caption + ".",
        caption + " please",
        "an " + caption[2:],
        caption.replace(" background", ""),
        caption.replace("on a ", "on an "),
        " ".join(words[1:]),  # leading article dropped
        " ".join(words[:-1]),
        " ".join(reversed(words)),
        caption.replace("circle", "circles")
        .replace("square", "squares")
        .replace("triangle", "triangles")
        .replace("cross", "crosses"),
    ]
    for i in range(len(words)):
        out.append(" ".join(words[:i] + words[i + 1 :]))  # one word dropped
        out.append(" ".join([*words[:i], "magenta", *words[i + 1 :]]))  # one word replaced
    return out


@FAST
@given(scenes())
def test_parse_rejects_near_miss_captions(scene: Scene) -> None:
    for text in _mutations(scene.caption()):
        with pytest.raises(ValueError):
            parse_caption(text)
        assert not is_caption(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle in the center on a white background",  # size missing
        "a large red circle on a white background",  # place missing
        "a large red circle in the middle on a white background",
        "a large red circle in the center on a blue background",  # blue is no background
        "a large white circle in the center on a white background",  # white is no object colour
        "a large red star in the center on a white background",
        "a medium red circle in the center on a white background",
        "a large red circle to the right of a small blue square on a white background",
        "a large red circle below a small blue square on a white background",
        "a large red circle to the left of a large red circle on a black background",
        "a large red circle in the center and a small blue square on a white background",
    ],
)
def test_parse_rejects_non_grammar(text: str) -> None:
    with pytest.raises(ValueError):
        parse_caption(text)
    assert not is_caption(text)


def test_captions_of_the_spec_examples() -> None:
    one = parse_caption("a large red circle in the center on a white background")
    assert one == Scene("white", (ShapeObject("large", "red", "circle", "center"),))
    two = parse_caption(
        "a small blue triangle to the left of a large yellow square on a black background"
    )
    assert two == Scene(
        "black",
        (
            ShapeObject("small", "blue", "triangle", "left"),
            ShapeObject("large", "yellow", "square", "right"),
        ),
    )
    above = parse_caption("a small green cross above a small green circle on a gray background")
    assert [o.slot for o in above.objects] == ["top", "bottom"]


# ----------------------------------------------------------------------------- scene rules


def test_scene_validation_errors() -> None:
    red = ShapeObject("large", "red", "circle", "left")
    with pytest.raises(ValueError, match="background"):
        Scene("blue", (ShapeObject("large", "red", "circle", "center"),))
    for bad in (
        ShapeObject("medium", "red", "circle", "center"),
        ShapeObject("large", "white", "circle", "center"),
        ShapeObject("large", "red", "star", "center"),
        ShapeObject("large", "red", "circle", "middle"),
    ):
        with pytest.raises(ValueError):
            Scene("white", (bad,))
    with pytest.raises(ValueError, match="one or two"):
        Scene("white", ())
    with pytest.raises(ValueError):
        Scene(
            "white",
            (
                red,
                ShapeObject("small", "blue", "square", "right"),
                ShapeObject("small", "blue", "square", "top"),
            ),
        )
    for slots in (("right", "left"), ("bottom", "top"), ("left", "top"), ("center", "right")):
        with pytest.raises(ValueError, match="two objects"):
            Scene(
                "white",
                (
                    ShapeObject("large", "red", "circle", slots[0]),
                    ShapeObject("small", "blue", "square", slots[1]),
                ),
            )
    with pytest.raises(ValueError, match="never both"):
        Scene("white", (red, ShapeObject("small", "red", "circle", "right")))
    # sharing one of colour or shape is allowed
    Scene("white", (red, ShapeObject("small", "red", "square", "right")))
    Scene("white", (red, ShapeObject("large", "blue", "circle", "right")))


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError):
        sample_scene(random.Random(0), "three")
    with pytest.raises(ValueError):
        render(sample_scene(random.Random(0)), random.Random(0), style="watercolour")
    with pytest.raises(ValueError):
        ShapesDataset(0, -1)
    with pytest.raises(IndexError):
        ShapesDataset(0, 3)[3]
    with pytest.raises(IndexError):
        ShapesDataset(0, 3)[-1]


# ----------------------------------------------------------------------------- renders


@RENDERS
@given(scenes(), st.integers(0, 2**32))
def test_render_edge_margin(scene: Scene, seed: int) -> None:
    rendered = render(scene, random.Random(seed))
    image = rendered.image
    assert image.shape == (CANVAS, CANVAS, 3)
    assert image.dtype == np.uint8
    border = np.ones((CANVAS, CANVAS), dtype=bool)
    border[EDGE_MARGIN:-EDGE_MARGIN, EDGE_MARGIN:-EDGE_MARGIN] = False
    assert (image[border] == BACKGROUND_COLORS[scene.background]).all()
    for coverage in rendered.coverage:
        assert not coverage[border].any()


def _covered_box_ok(coverage: np.ndarray, placement: Placement) -> bool:
    """Every covered pixel overlaps the object's (continuous) box."""
    x0, y0, x1, y1 = placement.box
    ys, xs = np.nonzero(coverage > 0)
    return bool(((xs + 1 > x0) & (xs < x1) & (ys + 1 > y0) & (ys < y1)).all())


@RENDERS
@given(scenes(kind="two"), st.integers(0, 2**32))
def test_render_gap_between_objects(scene: Scene, seed: int) -> None:
    rendered = render(scene, random.Random(seed))
    first, second = rendered.coverage
    for coverage, placement in zip(rendered.coverage, rendered.placements, strict=True):
        assert _covered_box_ok(coverage, placement)
    # the drawn boxes are OBJECT_GAP apart along the relation's axis...
    a, b = rendered.placements
    # axis 1: columns (left / right), axis 0: rows (top / bottom)
    axis = 1 if scene.objects[0].slot == "left" else 0
    gap = b.box[0] - a.box[2] if axis == 1 else b.box[1] - a.box[3]
    assert gap >= OBJECT_GAP
    # ...and in pixels: no shared pixel, and the covered pixels are at least OBJECT_GAP apart
    # (pixel-centre distance: an object edge may fall mid-pixel)
    assert not ((first > 0) & (second > 0)).any()
    first_end = np.nonzero((first > 0).any(axis=1 - axis))[0].max()
    second_start = np.nonzero((second > 0).any(axis=1 - axis))[0].min()
    assert second_start - first_end >= OBJECT_GAP
    # the columns / rows in between are pure background
    between = (
        rendered.image[:, first_end + 1 : second_start]
        if axis == 1
        else rendered.image[first_end + 1 : second_start]
    )
    assert between.size > 0
    assert (between == BACKGROUND_COLORS[scene.background]).all()


@RENDERS
@given(scenes(), st.integers(0, 2**32))
def test_render_flat_colours_are_exact(scene: Scene, seed: int) -> None:
    rendered = render(scene, random.Random(seed))
    image = rendered.image
    total = np.sum(rendered.coverage, axis=0)
    assert (image[total == 0] == BACKGROUND_COLORS[scene.background]).all()
    for obj, coverage in zip(scene.objects, rendered.coverage, strict=True):
        inside = coverage == 1.0
        assert inside.sum() > 0.4 * SIZES[obj.size] ** 2 * 0.5  # a triangle is half its box
        assert (image[inside] == OBJECT_COLORS[obj.color]).all()
    # anti-aliased edges: a partly covered pixel is the coverage-weighted mix of the two colours
    background = np.asarray(BACKGROUND_COLORS[scene.background], dtype=np.float64)
    for obj, coverage in zip(scene.objects, rendered.coverage, strict=True):
        partial = (coverage > 0) & (coverage < 1)
        alpha = coverage[partial].astype(np.float64)[:, None]
        mix = background * (1 - alpha) + np.asarray(OBJECT_COLORS[obj.color]) * alpha
        assert np.abs(image[partial] - mix).max(initial=0) <= 0.5 + 1e-3


@RENDERS
@given(scenes(), st.integers(0, 2**32))
def test_render_masks_and_placements(scene: Scene, seed: int) -> None:
    rendered = render(scene, random.Random(seed))
    assert len(rendered.coverage) == len(rendered.placements) == len(scene.objects)
    assert rendered.masks().shape == (len(scene.objects), CANVAS, CANVAS)
    for obj, placement in zip(scene.objects, rendered.placements, strict=True):
        anchor_x, anchor_y = SLOTS[obj.slot]
        assert abs(placement.center_x - anchor_x) <= 2
        assert abs(placement.center_y - anchor_y) <= 2
        assert abs(placement.extent - SIZES[obj.size]) <= 1


def test_render_is_deterministic_for_a_seed() -> None:
    scene = sample_scene(random.Random(1), "two")
    a = render(scene, random.Random(7)).image
    b = render(scene, random.Random(7)).image
    assert np.array_equal(a, b)


@RENDERS
@given(scenes(), st.integers(0, 2**32))
def test_gradient_style(scene: Scene, seed: int) -> None:
    rendered = render(scene, random.Random(seed), style="gradient")
    flat = render(scene, random.Random(seed), style="flat")
    assert rendered.placements == flat.placements
    total = np.sum(rendered.coverage, axis=0)
    assert (rendered.image[total == 0] == BACKGROUND_COLORS[scene.background]).all()
    for obj, coverage, placement in zip(
        scene.objects, rendered.coverage, rendered.placements, strict=True
    ):
        color = np.asarray(OBJECT_COLORS[obj.color], dtype=np.float64)
        _, top, _, bottom = placement.box
        rows, cols = np.nonzero(coverage == 1.0)
        progress = np.clip((rows + 0.5 - top) / (bottom - top), 0, 1)
        expected = (1 - (1 - GRADIENT_BOTTOM_BRIGHTNESS) * progress)[:, None] * color
        got = rendered.image[rows, cols].astype(np.float64)
        assert np.abs(got - expected).max() <= 1.0
        # brightness falls (never rises) row by row down the object
        means = [got[rows == r].mean() for r in np.unique(rows)]
        assert all(b <= a + 1e-9 for a, b in itertools.pairwise(means))


def test_gradient_from_palette_at_top_to_75_percent_at_bottom() -> None:
    """A large square with a box on whole pixels: top row ~ palette, bottom row ~ 75 %."""
    scene = Scene("black", (ShapeObject("large", "cyan", "square", "center"),))
    placement = Placement(32, 32, 22)  # box 21..43 on whole pixels
    image = render(scene, style="gradient", placements=(placement,)).image.astype(float)
    color = np.asarray(OBJECT_COLORS["cyan"], dtype=float)
    top_row, bottom_row = image[21, 25:39], image[42, 25:39]
    half_row = 0.5 / 22 * (1 - GRADIENT_BOTTOM_BRIGHTNESS)  # rows are sampled at their centres
    np.testing.assert_allclose(top_row, np.tile(color * (1 - half_row), (14, 1)), atol=1)
    np.testing.assert_allclose(
        bottom_row, np.tile(color * (GRADIENT_BOTTOM_BRIGHTNESS + half_row), (14, 1)), atol=1
    )
    assert np.abs(top_row - color).max() <= 2  # the palette colour, give or take rounding
    assert np.abs(bottom_row - GRADIENT_BOTTOM_BRIGHTNESS * color).max() <= 2


# ----------------------------------------------------------------------------- dataset


def test_dataset_is_deterministic_for_a_seed() -> None:
    a, b = ShapesDataset(3, 20), ShapesDataset(3, 20)
    for x, y in zip(a, b, strict=True):
        assert x.caption == y.caption
        assert x.scene == y.scene
        assert np.array_equal(x.rendered.image, y.rendered.image)
    # random access gives the same item as iteration
    assert a[11].caption == list(a)[11].caption
    assert np.array_equal(a[11].rendered.image, list(a)[11].rendered.image)


def test_dataset_differs_across_seeds() -> None:
    a, b = ShapesDataset(3, 20), ShapesDataset(4, 20)
    assert [s.caption for s in a] != [s.caption for s in b]
    assert (
        sum(np.array_equal(x.rendered.image, y.rendered.image) for x, y in zip(a, b, strict=True))
        < 3
    )


@pytest.mark.parametrize(("kind", "style"), [("one", "flat"), ("two", "gradient"), (None, "flat")])
def test_dataset_items_follow_kind_and_caption(kind: str | None, style: str) -> None:
    dataset = ShapesDataset(0, 30, kind=kind, style=style)
    assert len(dataset) == 30
    kinds = set()
    for sample in dataset:
        assert sample.caption == sample.scene.caption()
        assert parse_caption(sample.caption) == sample.scene
        kinds.add(sample.scene.kind)
        assert len(sample.rendered.coverage) == len(sample.scene.objects)
    assert kinds == ({"one", "two"} if kind is None else {kind})


# ----------------------------------------------------------------------------- fixed captions

# The evaluation captions must never change silently: every adherence number of
# the project is measured on them, and numbers taken on different sets do not compare.
FIXED_HEAD = [
    "a large red circle at the top on a gray background",
    "a large purple triangle above a large purple cross on a gray background",
]
FIXED_500_SHA256 = "1b14fa0ca0cb259d4b5471ef2d970e3e20d7020032b28ebf1a25301f7a8f1887"


def test_fixed_captions_are_fixed() -> None:
    captions = fixed_captions()
    assert len(captions) == 500
    assert captions == fixed_captions(500)
    assert captions[: len(FIXED_HEAD)] == FIXED_HEAD
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    assert digest == FIXED_500_SHA256
    # a shorter set is a prefix of the longer one, so small runs compare with large ones
    assert fixed_captions(100) == captions[:100]
    assert fixed_captions(500, seed=1) != captions


@pytest.mark.parametrize("count", [2, 100, 500, 1000])
def test_fixed_captions_half_one_half_two(count: int) -> None:
    captions = fixed_captions(count)
    kinds = [parse_caption(c).kind for c in captions]
    assert kinds.count("one") == kinds.count("two") == count // 2
    assert all(kinds[i] == ("one" if i % 2 == 0 else "two") for i in range(count))
