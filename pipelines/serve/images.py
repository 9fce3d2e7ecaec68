"""A request's image: its bytes (a data: URL's base64, an allowed http(s) host's download, an allowed
bucket's object) and the decoded image, each held to the config's limits; ApiError otherwise.

The pixel cap is checked from the image's header before anything is decoded, so a decompression
bomb (a small file that would decode to gigapixels) is refused without allocating it; downloads are
read to the byte limit and no further, and redirects are not followed (they could lead off an
allowed host).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings

from PIL import Image, UnidentifiedImageError

from pipelines.serve.api import ApiError, ImageRef
from pipelines.serve.config import ServeConfig

PARAM = "messages[0].content"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ARG002 - urllib's signature
        raise ApiError(400, f"the image URL redirects ({code}) to {newurl}; give the final URL", PARAM,
                       "invalid_image_url")


def image_bytes(ref: ImageRef, cfg: ServeConfig) -> bytes:
    """The image file's bytes, at most cfg.max_image_bytes."""
    if ref.scheme == "data":
        try:
            data = base64.b64decode(ref.payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"the image's data: URL is not valid base64 ({err})", PARAM,
                           "invalid_image_url") from None
    elif ref.scheme in ("http", "https"):
        data = _download(ref.url, cfg)
    else:
        data = _read_s3(ref.url, cfg)
    if len(data) > cfg.max_image_bytes:
        raise ApiError(400, f"the image is over the limit of {cfg.max_image_bytes} bytes", PARAM, "image_too_large")
    if not data:
        raise ApiError(400, "the image is empty (0 bytes)", PARAM, "invalid_image")
    return data


def _download(url: str, cfg: ServeConfig) -> bytes:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"Accept": "image/*"}), timeout=cfg.fetch_timeout_s) as r:
            return r.read(cfg.max_image_bytes + 1)
    except ApiError:
        raise
    except urllib.error.HTTPError as err:
        raise ApiError(400, f"fetching the image from {url} failed: HTTP {err.code}", PARAM,
                       "image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ApiError(400, f"fetching the image from {url} failed: {err}", PARAM, "image_fetch_failed") from None


def _read_s3(url: str, cfg: ServeConfig) -> bytes:
    from pipelines import storage

    fs, path = storage.fsspec_fs(url)
    try:
        size = fs.size(path)
        if size > cfg.max_image_bytes:
            raise ApiError(400, f"the image {url} has {size} bytes, over the limit of {cfg.max_image_bytes}",
                           PARAM, "image_too_large")
        return fs.cat_file(path)
    except ApiError:
        raise
    except FileNotFoundError:
        raise ApiError(400, f"the image {url} does not exist", PARAM, "image_fetch_failed") from None
    except Exception as err:  # s3fs raises many kinds (denied, throttled, network)
        raise ApiError(400, f"reading the image {url} failed: {type(err).__name__}: {err}", PARAM,
                       "image_fetch_failed") from None


def decode(data: bytes, cfg: ServeConfig) -> Image.Image:
    """The RGB image, fully decoded, after its header passed the pixel and aspect-ratio caps."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caps below decide
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height > cfg.max_image_pixels:
                raise ApiError(400, f"the image is {width} x {height} = {width * height} pixels, over the limit of "
                               f"{cfg.max_image_pixels}", PARAM, "image_too_large")
            if min(width, height) < 1:
                raise ApiError(400, f"the image is {width} x {height} pixels", PARAM, "invalid_image")
            if max(width, height) > cfg.max_aspect_ratio * min(width, height):
                raise ApiError(400, f"the image is {width} x {height} pixels, an aspect ratio over the limit of "
                               f"{cfg.max_aspect_ratio:g}", PARAM, "invalid_image")
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"the image is too large: {err}", PARAM, "image_too_large") from None
    except UnidentifiedImageError:
        raise ApiError(400, "the image's bytes are not an image format this server reads", PARAM,
                       "invalid_image") from None
    except Exception as err:  # PIL raises many kinds for bad data (truncated files among them)
        raise ApiError(400, f"the image does not decode: {type(err).__name__}: {err}", PARAM, "invalid_image") from None
