"""What a CLIP's patch features (the ones LLaVA's projector reads) say about the objects they show.

For held-out synthetic scenes, each object's patches (synthetic.scenes.patch_masks) are averaged and a
linear classifier is fitted on two thirds of the scenes to tell the object's colour, shape and 3x3 grid
cell, then scored on the other third. A question about "the triangle" or "where" the red one is can
only be answered from the visual tokens if these read-outs work: the ablation's LLM has nothing else
(TRIM's kept tokens lose the raster order that might otherwise tell where).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from synthetic.scenes import COLOURS, POSITIONS, SHAPES, patch_masks, random_scene, render
from trim.encoders import ClipEncoder

PROPERTIES = {"colour": list(COLOURS), "shape": list(SHAPES), "cell": list(POSITIONS)}
"""What is probed, and its classes (chance is about one over their number)."""


def object_features(encoder: ClipEncoder, num_scenes: int, seed: int,
                    batch: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(each object's mean patch feature [O, D], its labels per property [O], its scene index [O])."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, max_objects=3) for _ in range(num_scenes)]
    rows: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {name: [] for name in PROPERTIES}
    owner: list[int] = []
    for start in range(0, num_scenes, batch):
        chunk = scenes[start:start + batch]
        with torch.no_grad():
            features = encoder.encode_images([render(s) for s in chunk]).features.float()
        for offset, scene in enumerate(chunk):
            for obj, mask in zip(scene.objects, patch_masks(scene)):
                if not mask.any():
                    continue
                rows.append(features[offset][torch.from_numpy(mask)].mean(0))
                for name, classes in PROPERTIES.items():
                    labels[name].append(classes.index(getattr(obj, "position" if name == "cell" else name)))
                owner.append(start + offset)
    return torch.stack(rows), {k: torch.tensor(v) for k, v in labels.items()}, torch.tensor(owner)


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax classifier fitted (Adam, full batch) on the `train` rows."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-5
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(x.shape[1], classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(x[train] @ weight + bias, y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[~train] @ weight + bias).argmax(1) == y[~train]).float().mean())


def probe(encoder: ClipEncoder, num_scenes: int = 600, seed: int = 4242) -> dict[str, float]:
    """{"probe_colour", "probe_shape", "probe_cell"}: held-out read-out accuracy of each property, and
    "objects": how many objects were probed."""
    if num_scenes < 3:
        raise ValueError(f"feature probe: {num_scenes} scenes cannot be split into a training and a held-out part")
    x, labels, owner = object_features(encoder, num_scenes, seed)
    train = owner < (2 * num_scenes) // 3  # split by scene: no scene on both sides
    with torch.enable_grad():
        figures = {f"probe_{name}": linear_probe(x, labels[name], train, len(classes))
                   for name, classes in PROPERTIES.items()}
    return {**figures, "objects": float(len(x))}
