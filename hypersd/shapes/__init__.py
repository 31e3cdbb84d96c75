"""The Shapes world: a synthetic text-to-image domain small enough to train on a CPU."""

from hypersd.shapes.captions import (
    Scene,
    ShapeObject,
    is_caption,
    parse_caption,
    sample_scene,
    scene_to_caption,
)
from hypersd.shapes.dataset import (
    FINAL_CAPTION_SET,
    ShapesDataset,
    ShapesSample,
    fixed_captions,
)
from hypersd.shapes.render import Placement, Rendered, place_objects, render

__all__ = [
    "FINAL_CAPTION_SET",
    "Placement",
    "Rendered",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "ShapesSample",
    "fixed_captions",
    "is_caption",
    "parse_caption",
    "place_objects",
    "render",
    "sample_scene",
    "scene_to_caption",
]
