"""Precompute's CPU stage: a unit's image bytes decoded, padded to square and resized to 8-bit pixels
(LLaVA's preprocessing up to the CLIP processor's rescale and normalize, which the device does), its
samples' TRIM texts tokenized. Images are decoded one at a time and never padded at full resolution
(trim.square), so a task holds one decoded image (within shard.max_image_bytes) beside the unit's
compressed bytes and its 336 x 336 results. Many of these tasks run beside each encoder (as many as the cluster
has CPUs); what they hand on is arrays as bytes, so the encoder only copies them to the device.

`decode_unit` is the inverse the encoder actor applies: the row back into a UnitArrays.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.precompute.encode import UnitArrays
from trim.conversation import trim_text
from trim.encoders import ClipHost

PREPARED_SCHEMA = pa.schema([
    ("part", pa.string()), ("samples", pa.string()),
    ("pixels", pa.binary()), ("pixel_shape", pa.list_(pa.int64())),  # uint8 [I, 3, H, W]
    ("input_ids", pa.binary()), ("attention_mask", pa.binary()), ("text_shape", pa.list_(pa.int64())),  # int64 [S, L]
])

_HOSTS: dict[str, ClipHost] = {}


def _host(clip_path: str) -> ClipHost:
    """The checkpoint's processor and tokenizer, loaded once per worker process."""
    if clip_path not in _HOSTS:
        _HOSTS.clear()
        _HOSTS[clip_path] = ClipHost(clip_path)
    return _HOSTS[clip_path]


def prepare_unit(host: ClipHost, samples: list[dict], images: list[bytes], text_mode: Any,
                 grouped: bool) -> dict[str, Any]:
    """One unit's pixels and token ids (see the module doc). Texts are tokenized when some sample is
    encoded: every sample with an image, and with groups the text-only ones too."""
    if images:  # one image decoded at a time, padded and resized in strips (trim.square): bounded memory
        pixels = np.stack([host.prepare([Image.open(io.BytesIO(data))]).numpy()[0] for data in images])
    else:
        side = int(host.processor.crop_size.get("height") or 0)
        pixels = np.zeros((0, 3, side, side), dtype=np.uint8)
    if images or grouped:
        ids, mask = host.tokenize([trim_text(json.loads(s["conversations"]), text_mode) for s in samples])
        input_ids, attention_mask = ids.numpy().astype(np.int64), mask.numpy().astype(np.int64)
    else:
        input_ids = attention_mask = np.zeros((len(samples), 0), dtype=np.int64)
    return {"pixels": pixels.tobytes(), "pixel_shape": list(pixels.shape), "input_ids": input_ids.tobytes(),
            "attention_mask": attention_mask.tobytes(), "text_shape": list(input_ids.shape)}


def prepare_batch(batch: pa.Table, clip_path: str, text_mode: str, grouped: bool) -> pa.Table:
    """Ray Data map_batches function over gathered units (pipelines.precompute.units.UNIT_SCHEMA)."""
    host = _host(clip_path)
    rows = []
    for unit in batch.to_pylist():
        samples = json.loads(unit["samples"])
        rows.append({"part": unit["part"], "samples": unit["samples"],
                     **prepare_unit(host, samples, unit["images"], text_mode, grouped)})
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def decode_unit(row: dict[str, Any], seed: int) -> tuple[list[dict], UnitArrays]:
    """A prepared row as (the samples, their arrays) for the encoder stage."""
    samples = json.loads(row["samples"])
    pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape([int(n) for n in row["pixel_shape"]])
    shape = [int(n) for n in row["text_shape"]]
    groups = np.array([s["group"] for s in samples], dtype=np.int64)
    return samples, UnitArrays(
        pixels=pixels, image_of_sample=np.array([s["image"] for s in samples], dtype=np.int64),
        input_ids=np.frombuffer(row["input_ids"], dtype=np.int64).reshape(shape),
        attention_mask=np.frombuffer(row["attention_mask"], dtype=np.int64).reshape(shape),
        seeds=np.array([seed + int(s["index"]) for s in samples], dtype=np.int64),
        groups=groups if len(groups) and (groups >= 0).all() else None)
