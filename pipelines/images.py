"""Reading images from an image folder (local or s3://), in one place for every stage, with the checks
shard applies. (The shards' image tables, read by content key: pipelines.image_store.)

Only regular files are opened (a named pipe would block the reader, a directory, a socket or a device
is not an image); S3 reads that fail for a reason that may pass are retried with backoff, a bounded
number of times. An image over ShardConfig's caps (pixels, aspect ratio, the memory it takes decoded)
is set aside from its header, before it is decoded, with the setting named; PIL's own bomb check
(Image.MAX_IMAGE_PIXELS) is left as it is for every other reader, and where it fires first the image's
size is still read from its header, so the message names the shard's setting.
"""

from __future__ import annotations

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
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipelines import storage
from pipelines.config import ShardConfig

logger = logging.getLogger(__name__)

OUTSIDE_ROOT = "path outside image root"
"""The reason a record whose image path leaves the image root is set aside (it is never opened)."""
BAD_PATH = "unusable image path"
"""The reason a record whose image path no file can have (a NUL character) is set aside."""
S3_TRIES = 4
"""Reads of one S3 object before a failure that may pass (throttling, 5xx, a dropped connection) is
taken as persistent; s3fs's own retries come on top."""
S3_BACKOFF_S = 0.5
"""Wait before the second try; it doubles each try, with up to as much again of random jitter."""
_DEFAULT_CAPS = ShardConfig()


class OutsideRoot(ValueError):
    """An image path that leaves its image root ("..", an absolute path, a symlink out)."""


class UnusablePath(ValueError):
    """An image path no file can have (see unusable_path)."""


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


def unusable_path(relpath: str) -> str | None:
    """Why no file can have this path, or None: a NUL character (the C end of a string) in it."""
    if "\x00" in relpath:
        return f"{relpath!r} holds a NUL character (\\u0000), which no file name can"
    return None


def resolve(image_root: str, relpath: str) -> str:
    """The image's URI under image_root; raises OutsideRoot if it would leave the root, symlinks
    included for a local root, UnusablePath for a path no file can have."""
    unusable = unusable_path(relpath)
    if unusable:
        raise UnusablePath(unusable)
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
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:  # a socket cannot be opened at all ("No such device or address"): say what it is
        mode = _mode(path)
        if mode is not None and not stat.S_ISREG(mode):
            raise FileProblem("not a regular file", f"is {describe_mode(mode)}, not a regular file") from err
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem("not a regular file", f"is {describe_mode(info.st_mode)}, not a regular file")
        parts = []
        while part := os.read(fd, 2**24):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def describe_mode(mode: int) -> str:
    """What a file of this st_mode is, in words: "a directory", "a socket", "a named pipe"..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
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


def load_image(image_root: str, relpath: str, caps: ShardConfig = _DEFAULT_CAPS) -> dict[str, Any]:
    """Read, check, fully decode and hash one image, under caps' limits (max_image_pixels,
    max_aspect_ratio, max_image_bytes). Returns its row, or an error reason (the shard stage's reject
    reasons) with a detail that names the file and, for a limit, the setting."""
    row: dict[str, Any] = {"path": relpath, "image_key": None, "bytes": None, "width": 0, "height": 0,
                           "error": None, "detail": None}
    try:
        uri = resolve(image_root, relpath)
    except (OutsideRoot, UnusablePath) as err:
        row["error"] = OUTSIDE_ROOT if isinstance(err, OutsideRoot) else BAD_PATH
        row["detail"] = f"image {relpath!r}: {err}"
        return row
    try:
        data = read_file(uri)
    except FileProblem as err:
        row["error"], row["detail"] = err.reason, f"image {uri}: {err}"
        return row
    if not data:
        row["error"], row["detail"] = "empty file", f"image {uri}: 0 bytes"
        return row
    problem = _decode_checked(data, caps, row)
    if problem:
        row["error"], row["detail"] = problem[0], f"image {uri}: {problem[1]}"
        return row
    row["image_key"] = hashlib.sha256(data).hexdigest()
    row["bytes"] = data
    return row


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """The memory an image takes decoded as PIL holds it in its own mode (1 byte a pixel for modes 1,
    L and P, 2 for 16-bit ones, 4 for every other: PIL keeps 3- and 4-band images in 32-bit pixels),
    plus its RGB copy, which the stages that pad and resize it make."""
    own = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (own + (0 if mode == "RGB" else 4))


def over_caps(width: int, height: int, mode: str, caps: ShardConfig) -> tuple[str, str] | None:
    """(reason, why) if an image of this size and mode breaks one of caps' limits, naming the setting;
    else None."""
    if width * height > caps.max_image_pixels:
        return "image too large", (f"{width} x {height} = {width * height} pixels, over the cap of "
                                   f"{caps.max_image_pixels} (shard.max_image_pixels)")
    if min(width, height) < 1:
        return "unreadable image", f"{width} x {height} pixels"
    if max(width, height) > caps.max_aspect_ratio * min(width, height):
        return "extreme aspect ratio", (f"{width} x {height} pixels, aspect ratio "
                                        f"{max(width, height) / min(width, height):.0f}, over the cap of "
                                        f"{caps.max_aspect_ratio:g} (shard.max_aspect_ratio)")
    need = decoded_bytes(width, height, mode)
    if need > caps.max_image_bytes:
        return "image too large", (f"{width} x {height} pixels of mode {mode} take {need} bytes decoded, over "
                                   f"the per-image memory budget of {caps.max_image_bytes} (shard.max_image_bytes)")
    return None


def _decode_checked(data: bytes, caps: ShardConfig, row: dict) -> tuple[str, str] | None:
    """(reason, why) if the image breaks a cap (judged from its header, before decoding) or does not
    decode in full; else None, with its size in row."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caps below decide
            image = Image.open(io.BytesIO(data))
        with image:
            problem = over_caps(*image.size, image.mode, caps)
            if problem:
                return problem
            image.load()  # decode it all: truncated files fail here, not in precompute
            row["width"], row["height"] = image.size
    except Image.DecompressionBombError as err:  # PIL's own limit fired before the caps could
        return _over_pil_limit(data, caps, err)
    except UnidentifiedImageError:
        return "unreadable image", "cannot identify an image format in its bytes"
    except Exception as err:  # PIL raises many types for bad data
        return "unreadable image", f"{type(err).__name__}: {err}"
    return None


def _over_pil_limit(data: bytes, caps: ShardConfig, err: Exception) -> tuple[str, str]:
    """Why an image PIL refuses as a decompression bomb is set aside: the caps' reason where its header
    (read by its format's own plugin, without PIL's check) breaks one, else PIL's limit, which bounds
    a larger shard.max_image_pixels."""
    Image.init()
    for format_id in Image.ID:  # the registry Image.open walks, with the same acceptance test
        factory, accept = Image.OPEN[format_id]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            with factory(io.BytesIO(data), "") as image:
                size, mode = image.size, image.mode
        except Exception:  # not this format: try the next, as Image.open does
            continue
        problem = over_caps(*size, mode, caps)
        if problem:
            return problem
        return "image too large", (f"{size[0]} x {size[1]} pixels, over PIL's limit of "
                                   f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, which bounds "
                                   f"shard.max_image_pixels ({caps.max_image_pixels})")
    return "image too large", f"{err} (shard.max_image_pixels is {caps.max_image_pixels})"


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
