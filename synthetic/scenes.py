"""Synthetic scenes whose content is known to the pixel: the data of the project's tiny CLIP, of the
grounding measurement and of the ablation.

A scene is a few shapes of named colours, sizes and positions (one per cell of a 3x3 grid, so "where"
has one answer) on a muted, textured background, at any aspect ratio. `patch_masks` says which of the
576 CLIP patches (LLaVA's pad-to-square, 336 px, patch 14) each object covers, so what TRIM keeps can
be checked against what the question names. Same seed, same scene, same pixels.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "black": (10, 10, 10), "white": (250, 250, 250), "orange": (250, 140, 20), "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Cells of the 3x3 grid, row by row; the name is the answer to "where is the ...?".
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right")
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.28}
"""Object side as a share of the image's shorter side."""
ASPECTS = ((336, 336), (336, 336), (448, 336), (336, 448), (480, 320), (400, 300))
"""Image sizes drawn from: half square, half not (so LLaVA's padding shows up as it does on real data)."""
CLIP_SIZE, PATCH = 336, 14
GRID = CLIP_SIZE // PATCH


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape."""

    shape: str
    colour: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    """Pixel box (x0, y0, x1, y1) in the scene's own image."""


@dataclass(frozen=True)
class Scene:
    """What an image shows, enough to redraw it exactly."""

    width: int
    height: int
    background: tuple[int, int, int]
    texture_seed: int
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def with_shape(self, shape: str) -> list[SceneObject]:
        return [o for o in self.objects if o.shape == shape]


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A muted colour (low saturation, mid brightness): never one of the named colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.8))
    return int(r * 255), int(g * 255), int(b * 255)


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 4, repeat_shapes: float = 0.3,
                 size: tuple[int, int] | None = None) -> Scene:
    """A scene of min..max objects in distinct cells. With probability `repeat_shapes` a shape already
    drawn may be drawn again (so "how many" has answers above one); otherwise shapes are distinct."""
    width, height = size or rng.choice(ASPECTS)
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(len(POSITIONS)), count)
    objects: list[SceneObject] = []
    for cell in cells:
        drawn = [o.shape for o in objects]
        if drawn and rng.random() < repeat_shapes:
            shape = rng.choice(drawn)
        else:
            shape = rng.choice([s for s in SHAPES if s not in drawn] or list(SHAPES))
        size_name = rng.choice(list(SIZES))
        side = int(min(width, height) * SIZES[size_name] * rng.uniform(0.9, 1.1))
        cell_w, cell_h = width / 3, height / 3
        col, row = cell % 3, cell // 3
        # Centre jittered inside the cell, the shape kept inside it.
        cx = col * cell_w + cell_w / 2 + rng.uniform(-1, 1) * max(0.0, (cell_w - side) / 2)
        cy = row * cell_h + cell_h / 2 + rng.uniform(-1, 1) * max(0.0, (cell_h - side) / 2)
        x0, y0 = int(cx - side / 2), int(cy - side / 2)
        objects.append(SceneObject(shape, rng.choice(list(COLOURS)), size_name, POSITIONS[cell],
                                   (x0, y0, x0 + side, y0 + side)))
    return Scene(width, height, _background(rng), rng.randrange(2**31), tuple(objects))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (cx, y0), (x1, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x0, cy - h / 6, x1, cy + h / 6), fill=fill)
        draw.rectangle((cx - w / 6, y0, cx + w / 6, y1), fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            angle = np.pi / 2 + k * np.pi / 5
            radius = (w / 2) if k % 2 == 0 else (w / 5)
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image: a background with a soft gradient and fine noise, then the shapes."""
    rng = np.random.default_rng(scene.texture_seed)
    base = np.array(scene.background, dtype=np.float32)
    ys = np.linspace(-1, 1, scene.height, dtype=np.float32)[:, None, None]
    xs = np.linspace(-1, 1, scene.width, dtype=np.float32)[None, :, None]
    direction = rng.uniform(-1, 1, size=2).astype(np.float32)
    gradient = 25.0 * (direction[0] * xs + direction[1] * ys)
    noise = rng.normal(0, 6, size=(scene.height, scene.width, 1)).astype(np.float32)
    pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
    return image


def patch_masks(scene: Scene, min_cover: float = 0.3) -> np.ndarray:
    """[objects, 576] bool: the CLIP patches each object covers by at least `min_cover` of their area,
    in the frame CLIP sees (padded to a square, centred, as LLaVA does, then resized to 336)."""
    side = max(scene.width, scene.height)
    scale = CLIP_SIZE / side
    off_x, off_y = (side - scene.width) / 2, (side - scene.height) / 2
    masks = []
    for obj in scene.objects:
        canvas = Image.new("L", (CLIP_SIZE, CLIP_SIZE), 0)
        x0, y0, x1, y1 = obj.box
        box = ((x0 + off_x) * scale, (y0 + off_y) * scale, (x1 + off_x) * scale, (y1 + off_y) * scale)
        _draw_shape(ImageDraw.Draw(canvas), obj.shape, box, 255)
        cover = np.asarray(canvas, dtype=np.float32).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)) / 255
        masks.append((cover >= min_cover).reshape(-1))
    return np.stack(masks) if masks else np.zeros((0, GRID * GRID), dtype=bool)
