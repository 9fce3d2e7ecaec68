"""Does TRIM keep what the question is about? Measured on held-out synthetic scenes.

For questions that name one object ("What is the colour of the triangle?", the triangle unique in its
scene), with the CLIP at `clip_path` and each TRIM setting:
- precision: the share of TRIM's kept patches that lie on the named object;
- recall: the share of the object's patches that TRIM keeps;
- kept: the mean number of patches kept (of 576).
A "random" row (the same counts, patches drawn at random) is the chance level of both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from synthetic.scenes import Scene, patch_masks, random_scene, render
from trim.config import TrimConfig
from trim.core import trim_tokens
from trim.encoders import ClipEncoder

RATIO = 0.05
"""The fixed-ratio rows keep int(576 * 0.05) = 28 patches (the released code's `TRIM:0.05`)."""


@dataclass(frozen=True)
class GroundingCase:
    """One question about one object of one scene."""

    scene: Scene
    question: str
    object_index: int


def settings() -> dict[str, TrimConfig]:
    """The rows: each sign (the released code's, keeping the least similar by the negated dot product;
    the paper's, keeping the most similar by cosine) with the IQR rule and with a fixed ratio; and
    random patches at the paper's IQR counts."""
    return {
        "released sign, IQR": TrimConfig(similarity="dot", keep="least_similar", threshold="iqr"),
        "paper sign, IQR": TrimConfig.paper(),
        f"released sign, ratio {RATIO}": TrimConfig(similarity="dot", keep="least_similar", threshold="ratio",
                                                    ratio=RATIO),
        f"paper sign, ratio {RATIO}": TrimConfig.fixed_ratio(RATIO),
        "random patches (paper's IQR counts)": TrimConfig(similarity="cosine", keep="most_similar",
                                                          selection="random"),
    }


def cases(num: int, seed: int = 777) -> list[GroundingCase]:
    """`num` held-out scenes (a seed the CLIP never trained on), one question each about a shape that
    is unique in its scene."""
    rng = random.Random(seed)
    out: list[GroundingCase] = []
    while len(out) < num:
        scene = random_scene(rng)
        unique = [i for i, o in enumerate(scene.objects) if len(scene.with_shape(o.shape)) == 1]
        if not unique:
            continue
        index = rng.choice(unique)
        out.append(GroundingCase(scene, f"What is the colour of the {scene.objects[index].shape}?", index))
    return out


def measure(encoder: ClipEncoder, items: list[GroundingCase], cfg: TrimConfig,
            batch_size: int = 25) -> dict[str, float]:
    """Mean precision, recall and kept count over the cases, for one setting."""
    precision, recall, kept = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        with torch.no_grad():
            image = encoder.encode_images([render(c.scene) for c in chunk])
            text = encoder.encode_texts([c.question for c in chunk])
            out = trim_tokens(image.features, image.patch_embeds, text, cfg)
        masks = out.keep_mask.cpu().numpy()
        for case, keep in zip(chunk, masks):
            target = patch_masks(case.scene)[case.object_index]
            hits = int((keep & target).sum())
            precision.append(hits / max(1, int(keep.sum())))
            recall.append(hits / max(1, int(target.sum())))
            kept.append(int(keep.sum()))
    return {"precision": float(np.mean(precision)), "recall": float(np.mean(recall)), "kept": float(np.mean(kept))}


def grounding_table(clip_path: str | Path, num: int = 200) -> list[dict]:
    """One row per setting: {"setting", "precision", "recall", "kept"}."""
    encoder = ClipEncoder(clip_path)
    items = cases(num)
    return [{"setting": name, **measure(encoder, items, cfg)} for name, cfg in settings().items()]


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | on the object (precision) | of the object kept (recall) | patches kept |",
             "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['kept']:.1f} |" for r in rows]
    return "\n".join(lines)
