"""trim.square: LLaVA's pad-to-square then resize, without the padded square, pixel for pixel."""

import numpy as np
import pytest
from PIL import Image

from trim.encoders import expand_to_square
from trim.square import STRIP_ROWS, padded_resize

BACKGROUND = (122, 116, 104)


@pytest.mark.parametrize("size", [(18000, 90), (90, 18000), (640, 480), (480, 640), (333, 500), (1001, 37),
                                  (37, 2 * STRIP_ROWS + 5), (7, 3), (3, 7), (200, 336), (336, 336), (500, 500)])
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_the_pixels_are_those_of_padding_first_and_resizing_after(size, resample):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = expand_to_square(image, BACKGROUND).resize((336, 336), resample)
    assert np.array_equal(np.asarray(padded_resize(image, BACKGROUND, 336, resample)), np.asarray(expected))


def test_other_modes_are_converted_to_rgb_first():
    image = Image.new("L", (50, 20), 200)
    expected = expand_to_square(image, BACKGROUND).resize((336, 336), Image.Resampling.BICUBIC)
    got = padded_resize(image, BACKGROUND, 336, Image.Resampling.BICUBIC)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(expected))
