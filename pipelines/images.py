"""Reading images, in one place for every stage: from an image folder (local or s3://) with the
checks shard applies, and from the shards' image table by content key (precompute, pictures).

Only regular files are opened (a named pipe would block the reader, a directory is not an image);
S3 reads that fail for a reason that may pass are retried with backoff, a bounded number of times.
An image over ShardConfig's caps on pixels or aspect ratio is set aside from its header, before it
is decoded; PIL's own bomb check (Image.MAX_IMAGE_PIXELS) is left as it is for every other reader.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import logging
import os
import random
import re
import stat
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipelines import storage
from pipelines.config import ShardConfig

logger = logging.getLogger(__name__)

OUTSIDE_ROOT = "path outside image root"
"""The reason a record whose image path leaves the image root is set aside (it is never opened)."""
S3_TRIES = 4
"""Reads of one S3 object before a failure that may pass (throttling, 5xx, a dropped connection) is
taken as persistent; s3fs's own retries come on top."""
S3_BACKOFF_S = 0.5
"""Wait before the second try; it doubles each try, with up to as much again of random jitter."""
_DEFAULT_CAPS = ShardConfig()


class OutsideRoot(ValueError):
    """An image path that leaves its image root ("..", an absolute path, a symlink out)."""


class FileProblem(OSError):
    """An image file that cannot be read: `reason` is the reject reason, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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


def read_file(uri: str) -> bytes:
    """The bytes of an image file, local or s3://; raises FileProblem (with the reject reason) if it
    is missing, not a regular file, unreadable, or an S3 read kept failing."""
    if storage.is_s3(uri):
        return read_with_retries(lambda: storage.read_bytes(uri), uri)
    try:
        return _read_regular(uri)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise FileProblem("missing file", "does not exist") from err
    except PermissionError as err:
        raise FileProblem("unreadable file", "permission denied") from err
    except OSError as err:
        if isinstance(err, FileProblem):
            raise
        what = "a symlink loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise FileProblem("unreadable file", what) from err


def _read_regular(path: str) -> bytes:
    # Opened without blocking and checked on the open descriptor: a named pipe swapped in after a
    # stat could still block a plain open.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem("not a regular file", f"is {_kind(info.st_mode)}, not a regular file")
        parts = []
        while part := os.read(fd, 2**24):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def read_with_retries(read: Callable[[], bytes], uri: str, tries: int | None = None, backoff_s: float | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> bytes:
    """read(), tried again with exponential backoff and jitter while it fails for a reason that may
    pass (default: S3_TRIES tries, S3_BACKOFF_S first wait); a missing or forbidden object, or the
    last failure, raises FileProblem."""
    tries = S3_TRIES if tries is None else tries
    backoff_s = S3_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, tries + 1):
        try:
            return read()
        except (FileNotFoundError, NotADirectoryError) as err:
            raise FileProblem("missing file", "does not exist") from err
        except IsADirectoryError as err:
            raise FileProblem("not a regular file", "is a directory (a key prefix), not an object") from err
        except PermissionError as err:
            raise FileProblem("unreadable file", f"permission denied ({err})") from err
        except Exception as err:  # s3fs and botocore raise many types for throttling, 5xx, network errors
            if attempt == tries or (isinstance(err, OSError) and err.errno == errno.EINVAL):
                raise FileProblem("unreadable file", f"{type(err).__name__}: {err} (tried {attempt} times)") from err
            delay = backoff_s * 2 ** (attempt - 1) * (1 + random.random())
            logger.warning("reading %s failed (%s: %s); try %d of %d in %.1f s", uri, type(err).__name__, err,
                           attempt + 1, tries, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def load_image(image_root: str, relpath: str, max_pixels: int = _DEFAULT_CAPS.max_image_pixels,
               max_aspect_ratio: float = _DEFAULT_CAPS.max_aspect_ratio) -> dict[str, Any]:
    """Read, check, fully decode and hash one image. Returns its row, or an error reason (the shard
    stage's reject reasons) with a detail that names the file."""
    row: dict[str, Any] = {"path": relpath, "image_key": None, "bytes": None, "width": 0, "height": 0,
                           "error": None, "detail": None}
    try:
        uri = resolve(image_root, relpath)
    except OutsideRoot as err:
        row["error"], row["detail"] = OUTSIDE_ROOT, f"image {relpath}: {err}"
        return row
    try:
        data = read_file(uri)
    except FileProblem as err:
        row["error"], row["detail"] = err.reason, f"image {uri}: {err}"
        return row
    if not data:
        row["error"], row["detail"] = "empty file", f"image {uri}: 0 bytes"
        return row
    problem = _decode_checked(data, max_pixels, max_aspect_ratio, row)
    if problem:
        row["error"], row["detail"] = problem[0], f"image {uri}: {problem[1]}"
        return row
    row["image_key"] = hashlib.sha256(data).hexdigest()
    row["bytes"] = data
    return row


def _decode_checked(data: bytes, max_pixels: int, max_aspect_ratio: float, row: dict) -> tuple[str, str] | None:
    """(reason, why) if the image breaks a cap (judged from its header, before decoding) or does not
    decode in full; else None, with its size in row."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caps below decide
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height > max_pixels:
                return "image too large", (f"{width} x {height} = {width * height} pixels, over the cap of "
                                           f"{max_pixels} (shard.max_image_pixels)")
            if min(width, height) < 1:
                return "unreadable image", f"{width} x {height} pixels"
            if max(width, height) > max_aspect_ratio * min(width, height):
                return "extreme aspect ratio", (f"{width} x {height} pixels, aspect ratio "
                                                f"{max(width, height) / min(width, height):.0f}, over the cap of "
                                                f"{max_aspect_ratio:g} (shard.max_aspect_ratio)")
            image.load()  # decode it all: truncated files fail here, not in precompute
            row["width"], row["height"] = width, height
    except Image.DecompressionBombError as err:
        return "image too large", str(err)
    except UnidentifiedImageError:
        return "unreadable image", "cannot identify an image format in its bytes"
    except Exception as err:  # PIL raises many types for bad data
        return "unreadable image", f"{type(err).__name__}: {err}"
    return None


def read_image(image_root: str, relpath: str) -> Image.Image:
    """An image of a folder (local or s3://), fully decoded (so a truncated file fails here).
    Raises OutsideRoot for a path that leaves the folder, FileProblem for a file that cannot be read."""
    uri = resolve(image_root, relpath)
    try:
        image = Image.open(io.BytesIO(read_file(uri)))
    except FileProblem as err:
        raise FileProblem(err.reason, f"image {uri}: {err}") from err
    image.load()
    return image.convert("RGB")


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
