"""Shard's images: every distinct path read, checked and hashed by workers; identical bytes stored once,
each in the file its content key hashes to (pipelines.images.IMAGE_LAYOUT), written by workers.

Two passes over the image folder, both in workers: the first reads, fully decodes and hashes each
distinct path and returns small rows (no bytes) from which the driver picks one path per content key;
the second reads the paths of the keys the kept samples use again, checks the bytes still hash to
their key and writes one file per bucket, rows sorted by key. Output files depend only on the set of
images, never on task timing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.images import bucket_of, images_file, load_image, resolve

IMAGE_SCHEMA = pa.schema([("image_key", pa.string()), ("bytes", pa.binary()), ("width", pa.int32()),
                          ("height", pa.int32())])
IMAGE_ROW_GROUP = 1  # one image per row group: precompute and pictures fetch single images by key


def hash_image_batch(batch: dict[str, Any], image_root: str) -> dict[str, list]:
    """Ray Data map_batches function over {"path": [...]}: each image read, decoded and hashed; the
    bytes are dropped (the write pass reads them again). Empty strings stand for "none", so every
    column keeps one Arrow type whatever mix of good and bad images a batch holds."""
    rows = [load_image(image_root, str(p)) for p in batch["path"]]
    columns = ("path", "image_key", "width", "height", "error", "detail")
    return {k: [r[k] if r[k] is not None else "" for r in rows] for k in columns} | {
        "size": [len(r["bytes"] or b"") for r in rows]}


@dataclass
class ImageIndex:
    """What the hash pass found: per distinct path its key or its error (the driver holds one entry per
    distinct image path, never per sample)."""

    key_of: dict[str, str] = field(default_factory=dict)
    """Image path -> content key, for the images that read."""
    error_of: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Image path -> (reason, detail), for those that did not."""
    owner: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)
    """Content key -> (the first path with those bytes, width, height, size): the copy that is stored."""

    def add(self, path: str, key: str, width: int, height: int, size: int, error: str, detail: str) -> None:
        if error:
            self.error_of[path] = (error, detail)
            return
        self.key_of[path] = key
        if key not in self.owner or path < self.owner[key][0]:  # the same bytes under another name: stored once
            self.owner[key] = (path, int(width), int(height), int(size))

    def buckets(self, images_per_file: int, used: set[str] | None = None) -> list[dict[str, Any]]:
        """One work item per images file: its number and its images (key, path, width, height), sorted
        by key; the images whose key is in `used` (default: all). About images_per_file images per
        file; at least one file."""
        keys = sorted(self.owner if used is None else used)
        files = max(1, -(-len(keys) // images_per_file))
        items: list[dict[str, Any]] = [{"bucket": b, "keys": [], "paths": [], "widths": [], "heights": []}
                                       for b in range(files)]
        for key in keys:
            path, width, height, _ = self.owner[key]
            item = items[bucket_of(key, files)]
            item["keys"].append(key)
            item["paths"].append(path)
            item["widths"].append(width)
            item["heights"].append(height)
        return items


def write_bucket_batch(batch: dict[str, Any], image_root: str, out: str) -> dict[str, list]:
    """Ray Data map_batches function over bucket work items (see ImageIndex.buckets): each file written
    by the worker; returns (bucket, images, bytes) per file."""
    summary: dict[str, list] = {"bucket": [], "images": [], "bytes": []}
    for bucket, keys, paths, widths, heights in zip(batch["bucket"], batch["keys"], batch["paths"], batch["widths"],
                                                    batch["heights"]):
        data = [_read_checked(image_root, str(p), str(k)) for k, p in zip(keys, paths)]
        table = pa.table({"image_key": list(keys), "bytes": data, "width": list(widths), "height": list(heights)},
                         schema=IMAGE_SCHEMA)
        sink = pa.BufferOutputStream()
        # Images are compressed already: compressing their bytes again costs time and saves nothing.
        pq.write_table(table, sink, row_group_size=IMAGE_ROW_GROUP,
                       compression={"image_key": "zstd", "bytes": "none", "width": "zstd", "height": "zstd"})
        storage.write_bytes(storage.join(out, images_file(int(bucket))), sink.getvalue().to_pybytes())
        summary["bucket"].append(int(bucket))
        summary["images"].append(len(keys))
        summary["bytes"].append(sum(len(d) for d in data))
    return summary


def _read_checked(image_root: str, path: str, key: str) -> bytes:
    data = storage.read_bytes(resolve(image_root, path))
    if hashlib.sha256(data).hexdigest() != key:
        raise RuntimeError(f"image {path} changed while shard was running (its bytes no longer hash to {key}); "
                           f"run shard again")
    return data
