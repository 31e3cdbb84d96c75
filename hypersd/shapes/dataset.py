"""A deterministic (image, caption) dataset of the Shapes world."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from hypersd.shapes.captions import Scene, sample_scene
from hypersd.shapes.render import Rendered, render


@dataclass(frozen=True, slots=True)
class ShapesSample:
    scene: Scene
    caption: str
    rendered: Rendered


class ShapesDataset:
    """Item ``i`` is always the same scene, caption and render for the same ``seed``.

    Args:
        seed: the dataset's seed; each item draws from its own RNG seeded by (seed, index).
        length: the number of items.
        kind: ``one`` or ``two`` objects per scene, or None for a 50/50 mix.
        style: ``flat`` or ``gradient``.
    """

    def __init__(
        self, seed: int, length: int, *, kind: str | None = None, style: str = "flat"
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.seed, self.length, self.kind, self.style = seed, length, kind, style

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = random.Random(f"shapes:{self.seed}:{index}")
        scene = sample_scene(rng, self.kind)
        return ShapesSample(scene, scene.caption(), render(scene, rng, style=self.style))

    def __iter__(self) -> Iterator[ShapesSample]:
        return (self[i] for i in range(self.length))


# The caption set of the final numbers: ``fixed_captions(count, seed=FINAL_CAPTION_SET)``.
# Set 0 (the default seed) is the tables' and has guided choices; sets 1 and 2 have been used
# to choose between training runs. Set 3 is read by no training or selection step: use it
# only for numbers reported after every choice is made (``hypersd-train evaluate
# --caption-set 3``, the geometric judge's table in ``hypersd-train table``).
FINAL_CAPTION_SET = 3


def fixed_captions(count: int = 500, seed: int = 20261126) -> list[str]:
    """The fixed evaluation captions: half one-object, half two-object scenes.

    ``seed`` picks the set: the default is the tables' set; small numbers are other fixed
    sets (see ``FINAL_CAPTION_SET`` for the one kept for final numbers).
    """
    rng = random.Random(f"eval-captions:{seed}")
    return [sample_scene(rng, "one" if i % 2 == 0 else "two").caption() for i in range(count)]
