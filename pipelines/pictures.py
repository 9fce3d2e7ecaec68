"""TRIM pictures (the paper's Fig. 2): the image with the kept patches outlined beside the score
heatmap, for cached samples, shard samples, evaluation questions or answers, and as MLflow artifacts.

Cached samples are drawn from what the cache holds (kept indices, scores), so the picture shows what
training saw; shard samples and evaluation questions are scored online with the CLIP towers.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines import storage
from trim import TrimConfig
from trim.visualize import save_trim_picture


def safe_name(value: Any) -> str:
    """A file-name-safe form of a sample or question id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))[:120] or "_"


def keep_mask(kept_indices: Sequence[int], num_patches: int) -> np.ndarray:
    mask = np.zeros(num_patches, dtype=bool)
    mask[list(kept_indices)] = True
    return mask


def draw(image: Image.Image, scores: np.ndarray, kept_indices: Sequence[int], path: str | Path,
         title: str | None = None, background: tuple[int, int, int] | None = None) -> Path:
    """One picture from an image, its [N] scores and kept patch indices."""
    scores = np.asarray(scores, dtype=np.float32)
    kwargs: dict[str, Any] = {"background": background} if background else {}
    return save_trim_picture(image, scores, keep_mask(kept_indices, len(scores)), path, title=title, **kwargs)


def _title(name: Any, text: str, kept: int, total: int) -> str:
    text = " ".join(text.split())
    return f"{name}: {text[:70]}{'…' if len(text) > 70 else ''} ({kept}/{total} kept)"


def cache_pictures(shards: str, cache: str, out_dir: str | Path, ids: Iterable[str] | None = None,
                   count: int = 4) -> list[Path]:
    """Pictures of cached samples (the given ids, else the first `count` samples with an image, in
    cache order) from the cache's kept indices and scores and the shards' image bytes."""
    from pipelines.cache_format import decode_scores, iter_cache
    from pipelines.images import ImageStore

    wanted = None if ids is None else {str(i) for i in ids}
    rows = []
    columns = ["index", "id", "image_key", "num_tokens", "kept_indices", "scores", "conversations"]
    for row in iter_cache(cache, columns):
        if not row["num_tokens"] or (wanted is not None and row["id"] not in wanted):
            continue
        rows.append(row)
        if wanted is None and len(rows) >= count:
            break
    if not rows:
        return []
    images = ImageStore(shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        image = Image.open(io.BytesIO(images.get(row["image_key"])))
        scores = decode_scores(row)
        question = json.loads(row["conversations"])[0]["value"].replace("<image>", "")
        title = _title(row["id"], question, len(row["kept_indices"]), len(scores))
        # ids repeat in LLaVA's mixture: the file is named by the sample's position too
        name = f"sample-{row['index']:07d}-{safe_name(row['id'])}.png"
        paths.append(draw(image, scores, row["kept_indices"], out_dir / name, title))
    return paths


def online_pictures(encoder, items: Sequence[tuple[Any, Image.Image, str]], trim_cfg: TrimConfig,
                    out_dir: str | Path, batch_size: int = 8) -> list[Path]:
    """Pictures of (name, image, text) items scored online: CLIP + TRIM with trim_cfg, `text` being
    the text TRIM scores against. Batches of batch_size (the batch matters only for `official`)."""
    from trim.reduction import reduce_images

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        reduced = reduce_images(encoder, [image for _, image, _ in chunk], [text for _, _, text in chunk], trim_cfg)
        for b, (name, image, text) in enumerate(chunk):
            kept = np.flatnonzero(reduced.keep_mask[b].cpu().numpy()).tolist()
            scores = reduced.scores[b].float().cpu().numpy()
            paths.append(draw(image, scores, kept, out_dir / f"{safe_name(name)}.png",
                              _title(name, text, len(kept), len(scores)), background=encoder.background))
    return paths


def log_pictures(tracker, paths: Sequence[str | Path], artifact_path: str = "pictures") -> None:
    """Log picture files as MLflow artifacts under artifact_path (no-op for a disabled tracker)."""
    for path in paths:
        tracker.log_artifact(str(path), artifact_path)


def default_out_dir(root: str) -> str:
    return os.path.join(root, "pictures") if not storage.is_s3(root) else os.path.abspath("pictures")
