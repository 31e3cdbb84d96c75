"""The numbers of the Shapes world (v1), exactly as ``shared/shapes-world.md`` gives them."""

from typing import Final

CANVAS: Final = 64
EDGE_MARGIN: Final = 4  # every object pixel is at least this far from the canvas edge
OBJECT_GAP: Final = 2  # and at least this far from the other object
SUPERSAMPLE: Final = 4  # render at 4x and box-downsample for anti-aliased edges

OBJECT_COLORS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 215, 30),
    "green": (30, 160, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
}
BACKGROUND_COLORS: Final[dict[str, tuple[int, int, int]]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: Final = ("circle", "square", "triangle", "cross")
SIZES: Final[dict[str, int]] = {"small": 12, "large": 22}
SIZE_JITTER: Final = 1
SLOTS: Final[dict[str, tuple[int, int]]] = {
    "center": (32, 32),
    "left": (18, 32),
    "right": (46, 32),
    "top": (32, 18),
    "bottom": (32, 46),
}
ANCHOR_JITTER: Final = 2
PLACE_PHRASES: Final[dict[str, str]] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Two-object layouts: relation word -> (slot of the first object, slot of the second).
RELATIONS: Final[dict[str, tuple[str, str]]] = {
    "to the left of": ("left", "right"),
    "above": ("top", "bottom"),
}
STYLES: Final = ("flat", "gradient")
GRADIENT_BOTTOM_BRIGHTNESS: Final = 0.75
