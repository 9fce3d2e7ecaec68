"""Shard's images: every distinct path read, checked and hashed by workers; identical bytes stored once,
each in the file its content key hashes to (pipelines.image_store.IMAGE_LAYOUT), written by workers.

Two passes over the image folder, both in workers: the first stats each distinct path (size and
modification stamp), reads, fully decodes and hashes it and returns small rows (no bytes) from which
the driver picks one path per content key; the second reads the paths of the keys the kept samples
use again, checks the bytes still hash to their key and writes one file per bucket, rows sorted by
key. Output files depend only on the set of images, never on task timing.

The first pass also gives the images' part of the shards' identity (ImageIndex.digest) and the image
index written beside the shards (path, key, size, stamp): a later run takes the key of a path whose
size and stamp are unchanged from there instead of reading the image again, so a rerun over the same
images costs a stat per image, and one after a mixture change reads only the images that are new.
The stamp (pipelines.storage.stat) is, locally, the modification and the inode change times: bytes
replaced with the size and mtime put back still change the second, which no user call can set; on
S3 it is the object's ETag (a digest of its content). Should a stale key slip through anyway (a file
system with coarse times), the second pass finds the bytes no longer hash to it and the driver reads
those images again (pipelines.shard.stage), so a changed image is never kept stale nor an error forever.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import ShardConfig
from pipelines.image_store import bucket_of, images_file
from pipelines.images import FileProblem, load_image, over_caps, read_file, resolve

IMAGE_SCHEMA = pa.schema([("image_key", pa.string()), ("bytes", pa.binary()), ("width", pa.int32()),
                          ("height", pa.int32())])
IMAGE_ROW_GROUP = 1  # one image per row group: precompute and pictures fetch single images by key


INDEX_FILE = "image_index.parquet"
"""In the shards' version folder: every distinct image path with its key (or error), size and stamp."""
INDEX_SCHEMA = pa.schema([("path", pa.string()), ("image_key", pa.string()), ("width", pa.int32()),
                          ("height", pa.int32()), ("size", pa.int64()), ("stamp", pa.string()),
                          ("error", pa.string()), ("detail", pa.string())])
HASH_COLUMNS = ("path", "image_key", "width", "height", "size", "stamp", "error", "detail")


def hash_image_batch(batch: dict[str, Any], image_root: str, known: Any = None,
                     cfg: ShardConfig | None = None) -> dict[str, list]:
    """Ray Data map_batches function over {"path": [...]}: each image stat'ed, then read, decoded and
    hashed, unless `known` (path -> (size, stamp, key, width, height), or its object ref) has it with
    the same size and stamp; the bytes are dropped (the write pass reads them again). Empty strings
    stand for "none", so every column keeps one Arrow type whatever mix of good and bad images a
    batch holds. Images over cfg's caps on pixels and aspect ratio (default: ShardConfig's) are set
    aside before they are decoded."""
    previous = _known(known)
    caps = cfg or ShardConfig()
    rows = []
    for p in batch["path"]:
        path = str(p)
        size, stamp = _stat(image_root, path)  # before the read: a rewrite during it shows next time
        seen = previous.get(path)
        if stamp and seen is not None and (seen[0], seen[1]) == (size, stamp) and _within(caps, seen[3], seen[4]):
            rows.append({"path": path, "image_key": seen[2], "width": seen[3], "height": seen[4], "error": None,
                         "detail": None, "size": size, "stamp": stamp})
            continue
        row = load_image(image_root, path, caps)
        size = len(row.pop("bytes") or b"")  # the batch keeps rows, not bytes
        rows.append(row | {"size": size, "stamp": stamp if row["image_key"] else ""})
    return {k: [r[k] if r[k] is not None else "" for r in rows] for k in HASH_COLUMNS}


def _within(caps: ShardConfig, width: int, height: int) -> bool:
    """Whether a known image's size is within the caps (they may have been lowered since); the memory
    budget is judged for the mode that takes the most (the image is read again where it may not hold)."""
    return over_caps(width, height, "F", caps) is None


def _stat(image_root: str, path: str) -> tuple[int, str]:
    """(size, stamp) of an image file; (0, "") where it cannot be stat'ed (load_image then says why)."""
    try:
        return storage.stat(resolve(image_root, path))
    except (OSError, ValueError):
        return 0, ""


_KNOWN: dict[str, dict[str, tuple]] = {}


def _known(known: Any) -> dict[str, tuple]:
    """The previous index as a dict, fetched once per worker process where it is an object ref."""
    if known is None or isinstance(known, dict):
        return known or {}
    import ray

    key = known.hex()
    if key not in _KNOWN:
        _KNOWN.clear()
        _KNOWN[key] = ray.get(known)
    return _KNOWN[key]


def read_known(folder: str) -> dict[str, tuple]:
    """A shards version's image index as hash_image_batch's `known`: the paths that read, with their
    size, stamp, key, width and height."""
    table = storage.read_parquet(storage.join(folder, INDEX_FILE)).filter(pc.equal(pc.field("error"), ""))
    columns = [table.column(n).to_pylist() for n in ("path", "size", "stamp", "image_key", "width", "height")]
    return {path: rest for path, *rest in zip(*columns)}  # type: ignore[misc]


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
    stat_of: dict[str, tuple[int, str, int, int]] = field(default_factory=dict)
    """Image path -> (size, stamp, width, height), for the images that read."""

    def add(self, path: str, key: str, width: int, height: int, size: int, error: str, detail: str,
            stamp: str = "") -> None:
        if error:
            self.error_of[path] = (error, detail)
            return
        self.key_of[path] = key
        self.stat_of[path] = (int(size), stamp, int(width), int(height))
        if key not in self.owner or path < self.owner[key][0]:  # the same bytes under another name: stored once
            self.owner[key] = (path, int(width), int(height), int(size))

    def digest(self) -> str:
        """SHA-256 over every path with its content key and size, or its error reason: the images' part
        of the shards' identity (content, not stamps: a file rewritten with the same bytes is the same)."""
        digest = hashlib.sha256()
        for path in sorted(self.key_of.keys() | self.error_of.keys()):
            if path in self.key_of:
                line = f"{path}\t{self.key_of[path]}\t{self.stat_of.get(path, (0,))[0]}\n"
            else:
                line = f"{path}\t!{self.error_of[path][0]}\n"
            digest.update(line.encode("utf-8", errors="surrogatepass"))
        return digest.hexdigest()

    def table(self) -> pa.Table:
        """The index as rows of INDEX_SCHEMA, by path."""
        rows = []
        for path in sorted(self.key_of.keys() | self.error_of.keys()):
            if path in self.key_of:
                size, stamp, width, height = self.stat_of.get(path, (0, "", 0, 0))
                rows.append({"path": path, "image_key": self.key_of[path], "width": width, "height": height,
                             "size": size, "stamp": stamp, "error": "", "detail": ""})
            else:
                error, detail = self.error_of[path]
                rows.append({"path": path, "image_key": "", "width": 0, "height": 0, "size": 0, "stamp": "",
                             "error": error, "detail": detail})
        return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)

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
    by the worker; returns (bucket, images, bytes, changed) per file, `changed` the paths (a JSON list)
    whose bytes no longer hash to their key (the file is then not written: the driver reads them again)."""
    summary: dict[str, list] = {"bucket": [], "images": [], "bytes": [], "changed": []}
    for bucket, keys, paths, widths, heights in zip(batch["bucket"], batch["keys"], batch["paths"], batch["widths"],
                                                    batch["heights"]):
        data = [_read_checked(image_root, str(p), str(k)) for k, p in zip(keys, paths)]
        changed = [str(p) for p, d in zip(paths, data) if d is None]
        if not changed:
            table = pa.table({"image_key": list(keys), "bytes": data, "width": list(widths), "height": list(heights)},
                             schema=IMAGE_SCHEMA)
            sink = pa.BufferOutputStream()
            # Images are compressed already: compressing their bytes again costs time and saves nothing.
            pq.write_table(table, sink, row_group_size=IMAGE_ROW_GROUP,
                           compression={"image_key": "zstd", "bytes": "none", "width": "zstd", "height": "zstd"})
            storage.write_bytes(storage.join(out, images_file(int(bucket))), sink.getvalue().to_pybytes())
        summary["bucket"].append(int(bucket))
        summary["images"].append(len(keys))
        summary["bytes"].append(sum(len(d or b"") for d in data))
        summary["changed"].append(json.dumps(changed))  # text: Ray Data keeps a column of empty lists badly
    return summary


def _read_checked(image_root: str, path: str, key: str) -> bytes | None:
    """The image's bytes, or None where they no longer hash to the key the first pass gave it (its
    content changed since it was read or indexed)."""
    uri = resolve(image_root, path)
    try:
        data = read_file(uri)  # only regular files; S3 reads retried
    except FileProblem as err:  # it read in the first pass: the folder changed under the job
        raise RuntimeError(f"image {uri} read in the first pass but not now ({err.reason}: {err}); run shard "
                           f"again") from err
    return data if hashlib.sha256(data).hexdigest() == key else None
