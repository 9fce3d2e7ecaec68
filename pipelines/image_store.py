"""The shards' images tables: where the image of a content key is stored (its hash bucket), and the
store that fetches one image's bytes by key (precompute, pictures)."""

from __future__ import annotations

import bisect
from collections import OrderedDict

import pyarrow.parquet as pq

from pipelines import storage

IMAGE_LAYOUT = "hash-bucket"
"""The images tables' layout (ShardsManifest.image_layout): image `key` is in images-NNNNN.parquet with
NNNNN = bucket_of(key, files), rows sorted by key, one image per row group (fetched alone by key)."""


def bucket_of(key: str, files: int) -> int:
    """The images file holding the image of content key `key` (a sha256 hex digest) among `files`."""
    return int(key[:15], 16) % files


def images_file(number: int) -> str:
    return f"images-{number:05d}.parquet"


class ImageStore:
    """Images of the shards fetched by content key: the file from the key, the row group from the
    file's footer statistics (keys sorted, one image per row group), so one image costs one small
    read. Shards written before that layout are indexed by reading every file's keys once."""

    def __init__(self, shards: str, cached_files: int = 64):
        from pipelines.manifests import ShardsManifest

        self.shards = shards
        manifest = ShardsManifest.read_if_exists(shards)
        self.files = manifest.image_files if manifest and manifest.image_layout == IMAGE_LAYOUT else 0
        self._where: dict[str, tuple[str, int]] | None = None if self.files else self._scan()
        self._footers: OrderedDict[str, tuple[pq.ParquetFile, list[str]]] = OrderedDict()
        self._cached = cached_files

    def _scan(self) -> dict[str, tuple[str, int]]:
        where = {}
        for name in storage.listdir(self.shards, ".parquet"):
            if name.startswith("images-"):
                uri = storage.join(self.shards, name)
                for group, keys in enumerate(_row_group_keys(self._open(uri))):
                    where.update({key: (uri, group) for key in keys})
        return where

    def _open(self, uri: str) -> pq.ParquetFile:
        fs, path = storage.arrow_fs(uri)
        return pq.ParquetFile(fs.open_input_file(path))

    def _footer(self, uri: str) -> tuple[pq.ParquetFile, list[str]]:
        """The open file and the first key of each of its row groups (kept for a few files)."""
        if uri not in self._footers:
            handle = self._open(uri)
            column = handle.schema_arrow.get_field_index("image_key")
            meta = handle.metadata
            mins = [str(meta.row_group(g).column(column).statistics.min) for g in range(meta.num_row_groups)]
            self._footers[uri] = (handle, mins)
            if len(self._footers) > self._cached:
                self._footers.popitem(last=False)
        return self._footers[uri]

    def get(self, key: str) -> bytes:
        """The stored bytes of the image with content key `key`."""
        if self._where is not None:
            uri, group = self._where.get(key, ("", -1))
            handle = self._open(uri) if uri else None
        else:
            uri = storage.join(self.shards, images_file(bucket_of(key, self.files)))
            handle, mins = self._footer(uri)
            group = bisect.bisect_right(mins, key) - 1
        if handle is not None and group >= 0:
            table = handle.read_row_group(group, columns=["image_key", "bytes"])
            for stored, data in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                if stored == key:
                    return data
        raise KeyError(f"image {key} is not in the shards at {self.shards}")


def _row_group_keys(handle: pq.ParquetFile) -> list[list[str]]:
    return [handle.read_row_group(g, columns=["image_key"]).column(0).to_pylist()
            for g in range(handle.metadata.num_row_groups)]
