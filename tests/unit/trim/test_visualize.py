"""The TRIM picture: a valid PNG, clear errors, and kept patches really outlined."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from trim.visualize import (
    CLIP_IMAGE_MEAN,
    CLIP_MEAN_COLOUR,
    draw_kept_outlines,
    pad_to_square,
    patch_boxes,
    resolve_grid,
    save_trim_picture,
)

GREY = (128, 128, 128)
RED = (255, 0, 0)


def red_pixels(image: Image.Image) -> int:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())


@pytest.mark.parametrize("n, size", [(576, (336, 336)), (16, (200, 120))])
def test_writes_a_png(tmp_path, n, size):
    rng = np.random.default_rng(0)
    scores = rng.random(n)
    keep = scores > np.quantile(scores, 0.79)
    path = save_trim_picture(Image.new("RGB", size, GREY), scores, keep, tmp_path / "p.png",
                             title="a title")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (1000, 480)
        assert red_pixels(png) > 0


def test_no_kept_patch_no_outline_in_picture(tmp_path):
    scores = np.zeros(16)
    keep = np.zeros(16, dtype=bool)
    with Image.open(save_trim_picture(Image.new("RGB", (64, 64), GREY), scores, keep,
                                      tmp_path / "none.png")) as png:
        assert red_pixels(png) == 0
    keep[5] = True
    with Image.open(save_trim_picture(Image.new("RGB", (64, 64), GREY), scores, keep,
                                      tmp_path / "one.png")) as png:
        assert red_pixels(png) > 0


def test_accepts_tensors_and_keeps_backend(tmp_path):
    backend = matplotlib.get_backend()
    scores = torch.rand(16, dtype=torch.bfloat16)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[0] = True
    save_trim_picture(Image.new("RGB", (32, 32)), scores, keep, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend


def test_explicit_grid(tmp_path):
    save_trim_picture(Image.new("RGB", (50, 30)), np.arange(15.0), np.arange(15) % 2 == 0,
                      tmp_path / "g.png", grid=(3, 5))
    assert resolve_grid(15, (3, 5)) == (3, 5)
    assert resolve_grid(16) == (4, 4)
    assert resolve_grid(16, 4) == (4, 4)


@pytest.mark.parametrize("scores, keep, grid, message", [
    (np.zeros(15), np.zeros(15, bool), None, "perfect square"),
    (np.zeros(16), np.zeros(15, bool), None, "16 entries but keep_mask has 15"),
    (np.zeros(16), np.zeros(16, bool), (3, 5), "does not hold 16"),
    (np.zeros((4, 4)), np.zeros((4, 4), bool), None, "1-D"),
    (np.zeros(16), np.full(16, 2), None, "boolean"),
    (np.zeros(0), np.zeros(0, bool), None, "no patches"),
])
def test_bad_input(tmp_path, scores, keep, grid, message):
    with pytest.raises(ValueError, match=message):
        save_trim_picture(Image.new("RGB", (32, 32)), scores, keep, tmp_path / "x.png", grid=grid)
    assert not (tmp_path / "x.png").exists()


def test_clip_mean_colour_is_llavas_truncated_pad_colour():
    assert CLIP_MEAN_COLOUR == tuple(int(x * 255) for x in CLIP_IMAGE_MEAN) == (122, 116, 104)


def test_pad_to_square_centres_on_background():
    square = pad_to_square(Image.new("RGB", (200, 120), RED))
    assert square.size == (200, 200)
    # 80 rows of padding split 40 above, 40 below
    assert square.getpixel((100, 39)) == CLIP_MEAN_COLOUR
    assert square.getpixel((100, 40)) == RED
    assert square.getpixel((100, 159)) == RED
    assert square.getpixel((100, 160)) == CLIP_MEAN_COLOUR
    assert pad_to_square(Image.new("RGB", (10, 30)), (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)


def test_patch_boxes_single_kept_patch():
    keep = np.zeros(16, dtype=bool)
    keep[6] = True  # row 1, column 2 of a 4 x 4 grid; cells of 336 / 4 = 84 px
    assert patch_boxes(keep, (4, 4), 336) == [(168, 84, 252, 168)]
    keep = np.zeros(576, dtype=bool)
    keep[24 + 1] = True  # row 1, column 1 of 24 x 24; cells of 14 px
    assert patch_boxes(keep, (24, 24), 336) == [(14, 14, 28, 28)]


def test_outline_drawn_on_the_kept_patch_only():
    keep = np.zeros(16, dtype=bool)
    keep[6] = True
    out = draw_kept_outlines(Image.new("RGB", (336, 336), GREY), keep, (4, 4), RED, width=2)
    # the box edges of patch 6 (168..251 x 84..167), 2 px thick, inside the box
    for xy in [(168, 120), (169, 120), (251, 120), (250, 120), (200, 84), (200, 167)]:
        assert out.getpixel(xy) == RED, xy
    # its interior, just outside it, and another patch's edges stay grey
    for xy in [(170, 120), (210, 126), (167, 120), (252, 120), (200, 83), (0, 0), (84, 0)]:
        assert out.getpixel(xy) == GREY, xy
    assert red_pixels(out) == 84 * 84 - 80 * 80
