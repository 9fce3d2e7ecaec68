"""A picture of what TRIM kept: the padded image with kept patches outlined, beside the score
heatmap over the patch grid (the layout of the TRIM paper's Fig. 2).

Uses matplotlib's object API with the Agg canvas directly (no pyplot), so it neither needs a display
nor changes the backend or figure state of anyone else in the process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's image_mean (the processor config of openai/clip-vit-large-patch14-336)."""
CLIP_MEAN_COLOUR: Colour = (int(CLIP_IMAGE_MEAN[0] * 255), int(CLIP_IMAGE_MEAN[1] * 255), int(CLIP_IMAGE_MEAN[2] * 255))
"""The colour LLaVA pads images to square with: int(x * 255), truncated, = (122, 116, 104)."""


def pad_to_square(image: Image.Image, background: Colour = CLIP_MEAN_COLOUR) -> Image.Image:
    """Pad to a square of side max(w, h), the image centred, as LLaVA's expand2square does."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image.copy()
    side = max(width, height)
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _to_numpy(values: Any) -> np.ndarray:
    # torch tensors (any dtype, any device) without importing torch here.
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy() if values.is_floating_point() \
            else values.detach().cpu().numpy()
    return np.asarray(values)


def resolve_grid(n: int, grid: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of the patch grid for n patches: `grid` if given (an int means square), else
    sqrt(n) x sqrt(n). Raises ValueError if n is not a perfect square and no grid is given, or if
    the grid does not hold exactly n patches."""
    if n == 0:
        raise ValueError("no patches: scores and keep_mask are empty")
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches is not a perfect square; pass grid=(rows, cols)")
        return side, side
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    if rows <= 0 or cols <= 0 or rows * cols != n:
        raise ValueError(f"grid {rows}x{cols} does not hold {n} patches")
    return rows, cols


def patch_boxes(keep_mask: Any, grid: tuple[int, int], side: int) -> list[Box]:
    """Pixel boxes (left, top, right, bottom; right/bottom exclusive) of the kept patches on a
    side x side image, in raster order (patch i is row i // cols, column i % cols, as CLIP's)."""
    rows, cols = grid
    mask = _to_numpy(keep_mask).astype(bool).reshape(-1)
    xs = [round(c * side / cols) for c in range(cols + 1)]
    ys = [round(r * side / rows) for r in range(rows + 1)]
    return [(xs[i % cols], ys[i // cols], xs[i % cols + 1], ys[i // cols + 1])
            for i in np.flatnonzero(mask)]


def draw_kept_outlines(square: Image.Image, keep_mask: Any, grid: tuple[int, int],
                       colour: Colour = (255, 0, 0), width: int | None = None) -> Image.Image:
    """A copy of a square image with each kept patch's box outlined (inside the box, `width` px;
    default scales with the image so outlines survive downscaling in the figure)."""
    side = square.size[0]
    width = width if width is not None else max(1, round(side / 200))
    out = square.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for left, top, right, bottom in patch_boxes(keep_mask, grid, side):
        draw.rectangle((left, top, right - 1, bottom - 1), outline=colour, width=width)
    return out


def save_trim_picture(image: Image.Image, scores: Any, keep_mask: Any, path: str | Path,
                      grid: int | tuple[int, int] | None = None, title: str | None = None,
                      background: Colour = CLIP_MEAN_COLOUR,
                      outline: Colour = (255, 0, 0)) -> Path:
    """Write a PNG: left, the image padded to square (with `background`) with kept patches outlined;
    right, the [N] scores as a heatmap over the patch grid. `scores` and `keep_mask` are [N] arrays
    or tensors in raster order. Returns the path written."""
    # Imported here so importing trim never pulls in matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    score_values = _to_numpy(scores).astype(np.float64)
    mask = _to_numpy(keep_mask)
    if score_values.ndim != 1 or mask.ndim != 1:
        raise ValueError(f"scores and keep_mask must be 1-D [N], got shapes "
                         f"{score_values.shape} and {mask.shape}")
    if len(score_values) != len(mask):
        raise ValueError(f"scores has {len(score_values)} entries but keep_mask has {len(mask)}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError("keep_mask must be boolean (or 0/1)")
    mask = mask.astype(bool)
    rows, cols = resolve_grid(len(mask), grid)

    square = draw_kept_outlines(pad_to_square(image, background), mask, (rows, cols), outline)

    fig = Figure(figsize=(10, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(np.asarray(square))
    left.set_title(f"kept {int(mask.sum())} / {len(mask)} patches")
    left.set_axis_off()
    heat = right.imshow(score_values.reshape(rows, cols), cmap="viridis", interpolation="nearest")
    right.set_title("patch scores")
    right.set_xticks([])
    right.set_yticks([])
    fig.colorbar(heat, ax=right, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, format="png")
    return path
