"""A region of an image to search by (a box drawn on the page), and the crop it makes.

The box is fractions of the image size, so it means the same whatever the decoded resolution;
the routes parse it from their text field (service/api/uploads.py parse_box).
"""

from __future__ import annotations

from typing import NamedTuple

from PIL import Image

MIN_BOX_PIXELS = 16  # a smaller crop holds too little to search by


class Box(NamedTuple):
    """left, top, right, bottom as fractions of the image's width and height, 0 to 1."""

    left: float
    top: float
    right: float
    bottom: float


def crop_to_box(image: Image.Image, box: Box) -> Image.Image:
    """The part of `image` inside `box`; ValueError when it is under MIN_BOX_PIXELS a side."""
    width, height = image.size
    left, top = round(box.left * width), round(box.top * height)
    right, bottom = round(box.right * width), round(box.bottom * height)
    if min(right - left, bottom - top) < MIN_BOX_PIXELS:
        raise ValueError(
            f"the box covers {right - left}x{bottom - top} pixels of this {width}x{height} "
            f"image; draw one at least {MIN_BOX_PIXELS} pixels on each side"
        )
    return image.crop((left, top, right, bottom))
