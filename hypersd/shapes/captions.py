"""Scenes (the attributes of an image) and the caption grammar that maps them one to one."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    PLACE_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    SLOTS,
)


@dataclass(frozen=True, slots=True)
class ShapeObject:
    """One object of a scene: its size name, colour name, shape name and anchor slot."""

    size: str
    color: str
    shape: str
    slot: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class Scene:
    """Everything a caption says: the background and one or two objects.

    Two-object scenes keep their objects in caption order: the first is in the
    left (``to the left of``) or top (``above``) slot.
    """

    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(
                f"background must be one of {sorted(BACKGROUND_COLORS)}, got {self.background!r}"
            )
        for obj in self.objects:
            _check_object(obj)
        if len(self.objects) == 2:
            slots = (self.objects[0].slot, self.objects[1].slot)
            if slots not in RELATIONS.values():
                raise ValueError(
                    f"two objects must sit in {sorted(RELATIONS.values())}, got {slots}"
                )
            first, second = self.objects
            if first.color == second.color and first.shape == second.shape:
                raise ValueError("the two objects may share colour or shape, never both")
        elif len(self.objects) != 1:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")

    @property
    def kind(self) -> str:
        """``one`` or ``two``: the caption kind the evaluation breaks results down by."""
        return "one" if len(self.objects) == 1 else "two"

    def caption(self) -> str:
        return scene_to_caption(self)


def _check_object(obj: ShapeObject) -> None:
    for field, value, allowed in (
        ("size", obj.size, SIZES),
        ("color", obj.color, OBJECT_COLORS),
        ("shape", obj.shape, SHAPES),
        ("slot", obj.slot, SLOTS),
    ):
        if value not in allowed:
            raise ValueError(f"{field} must be one of {sorted(allowed)}, got {value!r}")


def scene_to_caption(scene: Scene) -> str:
    """The one caption of ``scene``, per the grammar in shapes-world.md."""
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        text = f"{obj.phrase()} {PLACE_PHRASES[obj.slot]}"
    else:
        first, second = scene.objects
        relation = next(r for r, slots in RELATIONS.items() if slots == (first.slot, second.slot))
        text = f"{first.phrase()} {relation} {second.phrase()}"
    return f"{text} on a {scene.background} background"


_OBJECT = (
    rf"a (?P<size{{i}}>{'|'.join(SIZES)}) (?P<color{{i}}>{'|'.join(OBJECT_COLORS)}) "
    rf"(?P<shape{{i}}>{'|'.join(SHAPES)})"
)
_BACKGROUND = rf" on a (?P<background>{'|'.join(BACKGROUND_COLORS)}) background"
_ONE_OBJECT = re.compile(
    _OBJECT.format(i=0)
    + rf" (?P<place>{'|'.join(map(re.escape, PLACE_PHRASES.values()))})"
    + _BACKGROUND
)
_TWO_OBJECTS = re.compile(
    _OBJECT.format(i=0)
    + rf" (?P<relation>{'|'.join(map(re.escape, RELATIONS))}) "
    + _OBJECT.format(i=1)
    + _BACKGROUND
)


def parse_caption(caption: str) -> Scene:
    """Parse a caption back into its scene; ``ValueError`` if it is not in the grammar."""
    text = " ".join(caption.strip().split())
    if match := _ONE_OBJECT.fullmatch(text):
        slot = next(s for s, phrase in PLACE_PHRASES.items() if phrase == match["place"])
        objects: tuple[ShapeObject, ...] = (
            ShapeObject(match["size0"], match["color0"], match["shape0"], slot),
        )
    elif match := _TWO_OBJECTS.fullmatch(text):
        slots = RELATIONS[match["relation"]]
        objects = tuple(
            ShapeObject(match[f"size{i}"], match[f"color{i}"], match[f"shape{i}"], slots[i])
            for i in range(2)
        )
    else:
        raise ValueError(f"not a Shapes caption: {caption!r}")
    return Scene(match["background"], objects)


def is_caption(caption: str) -> bool:
    """True when ``caption`` is in the Shapes grammar."""
    try:
        parse_caption(caption)
    except ValueError:
        return False
    return True


def sample_scene(rng: random.Random, kind: str | None = None) -> Scene:
    """Sample a scene uniformly; ``kind`` is ``one``, ``two`` or None (a 50/50 mix)."""
    if kind is None:
        kind = rng.choice(("one", "two"))
    if kind not in ("one", "two"):
        raise ValueError(f"kind must be 'one', 'two' or None, got {kind!r}")
    background = rng.choice(sorted(BACKGROUND_COLORS))

    def random_object(slot: str) -> ShapeObject:
        return ShapeObject(
            rng.choice(list(SIZES)), rng.choice(list(OBJECT_COLORS)), rng.choice(SHAPES), slot
        )

    if kind == "one":
        return Scene(background, (random_object(rng.choice(list(SLOTS))),))
    first_slot, second_slot = rng.choice(list(RELATIONS.values()))
    first = random_object(first_slot)
    while True:
        second = random_object(second_slot)
        if (second.color, second.shape) != (first.color, first.shape):
            return Scene(background, (first, second))
