"""LLaVA's pad-to-square (`expand2square`) followed by a resize to a small square, with the exact pixels
of padding first and resizing after, but without the padded square at full resolution: an 18000 x 900
image pads to 18000 x 18000 (1.3 GB in PIL's 32-bit pixels) only to be resized to 336 x 336.

PIL resizes in two passes, horizontal then vertical, each rounding to 8 bits and each row or column of
a pass independent of the others. So the horizontal pass runs here on the padded square's rows a strip
at a time (a row of padding alone is the same row whatever image it pads: computed once), and the
vertical pass on the result, which is side pixels wide: memory holds the image, one strip and a
side x max(w, h) band, never the padded square.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

STRIP_ROWS = 256
"""Rows of the padded square resized horizontally at a time (a tall image's strips are padded left and right)."""


def padded_resize(image: Image.Image, background: tuple[int, int, int], side: int, resample: Any) -> Image.Image:
    """The image padded to a centred square with `background` and resized to side x side with
    `resample`: the same pixels as expand2square then resize, in bounded memory (module doc)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if width == height:
        return image if width == side else image.resize((side, side), resample)
    big = max(width, height)
    if width > height:  # padding above and below: whole rows of background
        padding = Image.new("RGB", (big, 1), background).resize((side, 1), resample)
        band = padding.resize((side, big), Image.Resampling.NEAREST)  # that one row, repeated
        band.paste(image.resize((side, height), resample), (0, (big - height) // 2))
    else:  # padding left and right of every row
        band = Image.new("RGB", (side, big))
        left = (big - width) // 2
        for top in range(0, big, STRIP_ROWS):
            rows = min(STRIP_ROWS, big - top)
            strip = Image.new("RGB", (big, rows), background)
            strip.paste(image.crop((0, top, width, top + rows)), (left, 0))
            band.paste(strip.resize((side, rows), resample), (0, top))
    return band.resize((side, side), resample)
