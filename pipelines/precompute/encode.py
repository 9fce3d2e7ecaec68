"""Precompute's device stage: a unit of samples, its images as 8-bit pixels and its texts as token ids
in, TRIM's results out on the host. Pure PyTorch over `trim/` (no Ray, no storage), so the GPU check
(benchmarks/gpu_check.py) times this very code.

On the device: the pixels normalized (a table lookup), the vision tower up to the selected layer, the
texts of every sample of the batch in one text-tower call, TRIM batched (one call per batch; with a
batch-wide IQR, one per group, as the released code's micro-batches). To the host: one copy of one
flat fp16 buffer (tokens, scores, keep masks) into pinned memory, after which the host waits once.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.reduced_rows import ReducedRows
from trim import TrimConfig, TrimOutput, trim_tokens
from trim.encoders import ClipTowers


def batch_grouped(cfg: TrimConfig) -> bool:
    """Whether TRIM's count depends on the batch (the released batch-wide IQR): samples are then
    processed in fixed groups (TrimConfig.batch_group_size consecutive samples in mixture order)."""
    return cfg.iqr_scope == "batch" and cfg.threshold == "iqr"


@dataclass
class UnitArrays:
    """One unit of work as the CPU stage hands it over."""

    pixels: np.ndarray
    """uint8 [I, 3, H, W]: the unit's distinct images, padded and resized (ClipHost.prepare)."""
    image_of_sample: np.ndarray
    """int64 [S]: each sample's image (a row of pixels), -1 for a text-only sample."""
    input_ids: np.ndarray
    """int64 [S, L]: each sample's TRIM text, tokenized."""
    attention_mask: np.ndarray
    """int64 [S, L]."""
    seeds: np.ndarray
    """int64 [S]: the "random" baseline's seed per sample (TrimConfig.seed + index)."""
    groups: np.ndarray | None = None
    """int64 [S]: each sample's group (batch-wide IQR), consecutive; None when TRIM is per sample."""


def sub_batches(image_of_sample: np.ndarray, groups: np.ndarray | None, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges whose distinct images number at most batch_size (more only when one
    group alone needs more), cut only between groups."""
    ranges: list[tuple[int, int]] = []
    start, seen = 0, set[int]()
    for i, image in enumerate(image_of_sample.tolist()):
        boundary = groups is None or i == 0 or groups[i] != groups[i - 1]
        if boundary and i > start and image >= 0 and image not in seen and len(seen) >= batch_size:
            ranges.append((start, i))
            start, seen = i, set[int]()
        if image >= 0:
            seen.add(image)
    if start < len(image_of_sample):
        ranges.append((start, len(image_of_sample)))
    return ranges


def encode_unit(towers: ClipTowers, unit: UnitArrays, cfg: TrimConfig, batch_size: int) -> ReducedRows:
    """TRIM's results for every sample of the unit (see the module doc). With a per-sample IQR the
    text-only samples are not encoded at all; with groups they score the zero image, as LLaVA's
    dummy image, inside their group's IQR, and their results are dropped."""
    grouped = unit.groups is not None
    has_image = unit.image_of_sample >= 0
    outputs: list[tuple[TrimOutput, np.ndarray]] = []  # (TRIM's output, which of its rows have an image)
    with torch.inference_mode():
        for start, end in sub_batches(unit.image_of_sample, unit.groups, batch_size):
            rows = np.arange(start, end) if grouped else start + np.flatnonzero(has_image[start:end])
            if len(rows):
                outputs += _encode_rows(towers, unit, rows, cfg)
        return _to_host(outputs, has_image, towers)


def _encode_rows(towers: ClipTowers, unit: UnitArrays, rows: np.ndarray, cfg: TrimConfig
                 ) -> list[tuple[TrimOutput, np.ndarray]]:
    images = unit.image_of_sample[rows]
    used = np.unique(images[images >= 0])
    local = np.searchsorted(used, images)
    features = patch_embeds = None
    if len(used):
        contiguous = used[-1] - used[0] + 1 == len(used)  # no host copy for a run of images
        pixels = unit.pixels[used[0]:used[-1] + 1] if contiguous else unit.pixels[used]
        with warnings.catch_warnings():  # read-only views of the CPU stage's buffer: only ever read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            encoded = towers.encode_levels(torch.from_numpy(pixels))
        features, patch_embeds = encoded.features, encoded.patch_embeds
    if (images < 0).any():  # the zero image, appended as the last row
        zero = towers.zero_image()
        features = zero.features if features is None else torch.cat([features, zero.features])
        patch_embeds = zero.patch_embeds if patch_embeds is None else torch.cat([patch_embeds, zero.patch_embeds])
        local = np.where(images < 0, len(used), local)
    assert features is not None and patch_embeds is not None
    if len(local) != features.shape[0] or (local != np.arange(len(local))).any():  # samples sharing an image
        index = torch.from_numpy(local).to(features.device, non_blocking=True)
        features, patch_embeds = features.index_select(0, index), patch_embeds.index_select(0, index)
    texts = towers.encode_tokens(torch.from_numpy(unit.input_ids[rows]), torch.from_numpy(unit.attention_mask[rows]))
    seeds = unit.seeds[rows].tolist()
    if unit.groups is None:
        return [(trim_tokens(features, patch_embeds, texts, cfg, seeds=seeds), images >= 0)]
    groups = unit.groups[rows]
    cuts = np.flatnonzero(np.diff(groups)) + 1
    bounds = zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(rows)]]).tolist())
    return [(trim_tokens(features[a:b], patch_embeds[a:b], texts[a:b], cfg, seeds=seeds[a:b]), images[a:b] >= 0)
            for a, b in bounds]


def _rows(tensor: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """The rows where keep is True, without the host sync a boolean mask on the device would cost."""
    if keep.all():
        return tensor
    return tensor.index_select(0, torch.from_numpy(np.flatnonzero(keep)).to(tensor.device, non_blocking=True))


_PINNED = threading.local()


def _pinned(count: int) -> torch.Tensor:
    """A page-locked fp16 host buffer of at least `count` values, kept per thread and reused."""
    buffer = getattr(_PINNED, "buffer", None)
    if buffer is None or buffer.numel() < count:
        buffer = torch.empty(int(count * 1.25) + 1024, dtype=torch.float16, pin_memory=True)
        _PINNED.buffer = buffer
    return buffer[:count]


def _to_host(outputs: list[tuple[TrimOutput, np.ndarray]], has_image: np.ndarray, towers: ClipTowers) -> ReducedRows:
    """The image rows' tokens, scores and keep masks in one fp16 buffer, copied to the host once."""
    dim = towers.model.config.vision_config.hidden_size
    tokens = [t for out, keep in outputs for t, k in zip(out.tokens, keep.tolist()) if k]
    scores = [_rows(out.scores, keep) for out, keep in outputs]
    masks = [_rows(out.keep_mask, keep) for out, keep in outputs]
    num_patches = outputs[0][0].scores.shape[1] if outputs else 0
    images = int(has_image.sum())
    token_count = sum(int(t.shape[0]) for t in tokens)
    parts = [torch.cat(tokens).reshape(-1)] if tokens else []
    parts += [torch.cat(scores).reshape(-1), torch.cat(masks).reshape(-1)] if outputs else []
    flat = torch.cat([p.to(torch.float16) for p in parts]) if parts else torch.zeros(0, dtype=torch.float16)
    if flat.is_cuda:
        host = _pinned(flat.numel()).copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
    else:
        host = flat
    values = host.numpy()
    split = token_count * dim
    num_tokens = np.zeros(len(has_image), dtype=np.int32)
    num_tokens[has_image] = [int(t.shape[0]) for t in tokens]
    num_kept = np.zeros(len(has_image), dtype=np.int32)
    num_kept[has_image] = np.concatenate([out.num_kept.numpy()[keep] for out, keep in outputs]) if outputs else []
    has_aggregate = np.zeros(len(has_image), dtype=bool)
    has_aggregate[has_image] = np.concatenate([out.has_aggregate.numpy()[keep] for out, keep in outputs]) \
        if outputs else []
    return ReducedRows(
        has_image=has_image, num_tokens=num_tokens, num_kept=num_kept, has_aggregate=has_aggregate,
        tokens=values[:split].reshape(token_count, dim),
        scores=values[split:split + images * num_patches].reshape(images, num_patches),
        keep=values[split + images * num_patches:].reshape(images, num_patches) > 0)
