"""The Shapes scene as class labels: one classification head per attribute.

The attribute network (``training.attributes``) reads an image into these labels.
The heads: background (3), layout (7: the five one-object slots, then
``left_right`` and ``top_bottom``), and colour / shape / size of object A (the
only object, or the left / top one) and of object B (the right / bottom one,
with an extra ``none`` class for one-object scenes, so an extra object in a
one-object image costs score), and ``extra`` (something drawn that the scene does
not explain).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hypersd.shapes import Scene, ShapeObject, parse_caption
from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    PLACE_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
)

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

IGNORE = -1  # a label that is not scored (the shape head of an odd shape, training.negatives)


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
