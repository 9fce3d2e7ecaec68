"""Reading images, in one place for every stage: from an image folder (local or s3://) with the
checks shard applies, and from the shards' image table by content key (precompute, pictures)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import OrderedDict
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage

OUTSIDE_ROOT = "path outside image root"
"""The reason a record whose image path leaves the image root is set aside (it is never opened)."""


class OutsideRoot(ValueError):
    """An image path that leaves its image root ("..", an absolute path, a symlink out)."""


def escapes_root(relpath: str) -> str | None:
    """Why a record's image path would leave the image root, judged from the text alone, or None:
    absolute paths, URIs and ".." components (s3:// roots have no symlinks, so this is all of it)."""
    if not relpath or relpath.startswith(("/", "\\")) or "://" in relpath or re.match(r"^[A-Za-z]:", relpath):
        return f"{relpath!r} is not a path relative to the image root"
    if ".." in re.split(r"[\\/]", relpath):
        return f"{relpath!r} climbs out of the image root with '..'"
    return None


def resolve(image_root: str, relpath: str) -> str:
    """The image's URI under image_root; raises OutsideRoot if it would leave the root, symlinks
    included for a local root."""
    problem = escapes_root(relpath)
    if problem:
        raise OutsideRoot(problem)
    uri = storage.join(image_root, relpath)
    if not storage.is_s3(image_root):
        real_root = os.path.realpath(image_root)
        if os.path.commonpath([real_root, os.path.realpath(uri)]) != real_root:
            raise OutsideRoot(f"{relpath!r} resolves to {os.path.realpath(uri)}, outside {real_root}")
    return uri


def load_image(image_root: str, relpath: str) -> dict[str, Any]:
    """Read, fully decode and hash one image. Returns its row, or an error reason."""
    row: dict[str, Any] = {"path": relpath, "image_key": None, "bytes": None, "width": 0, "height": 0,
                           "error": None, "detail": None}
    try:
        uri = resolve(image_root, relpath)
    except OutsideRoot as err:
        row["error"], row["detail"] = OUTSIDE_ROOT, f"image {relpath}: {err}"
        return row
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        row["error"], row["detail"] = "missing file", f"image {uri} does not exist"
        return row
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode it all: truncated files fail here, not in precompute
            row["width"], row["height"] = image.size
    except Exception as err:  # PIL raises many types for bad data
        row["error"], row["detail"] = "unreadable image", f"image {uri}: {type(err).__name__}: {err}"
        return row
    row["image_key"] = hashlib.sha256(data).hexdigest()
    row["bytes"] = data
    return row



def read_image(image_root: str, relpath: str) -> Image.Image:
    """An image of a folder (local or s3://), fully decoded (so a truncated file fails here).
    Raises OutsideRoot for a path that leaves the folder."""
    image = Image.open(io.BytesIO(storage.read_bytes(resolve(image_root, relpath))))
    image.load()
    return image.convert("RGB")



class ImageStore:
    """Images of the shards fetched by content key (row groups read on demand, a few kept)."""

    def __init__(self, shards: str, cached_groups: int = 8):
        self.shards = shards
        self.where: dict[str, tuple[str, int, int]] = {}
        for name in storage.listdir(shards, ".parquet"):
            if not name.startswith("images-"):
                continue
            uri = storage.join(shards, name)
            fs, path = storage.arrow_fs(uri)
            meta = pq.ParquetFile(path, filesystem=fs)
            for group in range(meta.num_row_groups):
                keys = meta.read_row_group(group, columns=["image_key"]).column(0).to_pylist()
                for row, key in enumerate(keys):
                    self.where[key] = (uri, group, row)
        self.order = list(self.where)
        self._groups: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._cached = cached_groups

    def get(self, key: str) -> bytes:
        if key not in self.where:
            raise KeyError(f"image {key} is not in the shards at {self.shards}")
        uri, group, row = self.where[key]
        if (uri, group) not in self._groups:
            fs, path = storage.arrow_fs(uri)
            table = pq.ParquetFile(path, filesystem=fs).read_row_group(group, columns=["bytes"])
            self._groups[(uri, group)] = table.column(0).to_pylist()
            if len(self._groups) > self._cached:
                self._groups.popitem(last=False)
        return self._groups[(uri, group)][row]
