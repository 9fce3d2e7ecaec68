"""Image bytes and decoding of the serving app (pipelines.serve.images): base64, size and pixel caps
(decompression bombs refused from the header), bytes that are not an image, downloads from a real
HTTP server on 127.0.0.1 (no redirects followed, the byte cap held)."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pipelines.serve.api import ApiError, ImageRef
from pipelines.serve.config import ServeConfig
from pipelines.serve.images import decode, image_bytes


def cfg(**kw) -> ServeConfig:
    return ServeConfig(model_dir="m", max_image_bytes=20_000, max_image_pixels=500 * 500, **kw)


def png(width: int, height: int, noise: bool = False) -> bytes:
    array = (np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8) if noise
             else np.full((height, width, 3), 90, dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def data_ref(data: bytes | str) -> ImageRef:
    payload = data if isinstance(data, str) else base64.b64encode(data).decode()
    return ImageRef("data", "data:...", "image/png", payload)


def code(call) -> str:
    with pytest.raises(ApiError) as raised:
        call()
    assert raised.value.status == 400
    return raised.value.code


def test_a_good_image_decodes_to_rgb():
    image = decode(image_bytes(data_ref(png(30, 20)), cfg()), cfg())
    assert image.mode == "RGB" and image.size == (30, 20)


def test_limits_and_bad_bytes():
    assert code(lambda: image_bytes(data_ref("%%%"), cfg())) == "invalid_image_url"
    assert code(lambda: image_bytes(data_ref(png(100, 100, noise=True)), cfg())) == "image_too_large"
    assert code(lambda: image_bytes(data_ref(b""), cfg())) == "invalid_image"
    assert code(lambda: decode(png(600, 600), cfg())) == "image_too_large"
    assert code(lambda: decode(bomb(200_000, 200_000), cfg())) == "image_too_large"
    assert code(lambda: decode(b"GIF89a not really", cfg())) == "invalid_image"
    assert code(lambda: decode(b"plain text", cfg())) == "invalid_image"
    assert code(lambda: decode(png(64, 64, noise=True)[:300], cfg())) == "invalid_image"
    assert code(lambda: decode(png(400, 10), cfg())) == "invalid_image"  # aspect ratio 40


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.example/a.png")
            self.end_headers()
            return
        body = {"/small.png": png(20, 20), "/huge.png": png(200, 200, noise=True)}.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_downloads_from_an_allowed_host(http_server):
    config = cfg(allowed_hosts=["127.0.0.1"])
    data = image_bytes(ImageRef("http", http_server + "/small.png"), config)
    assert decode(data, config).size == (20, 20)
    assert code(lambda: image_bytes(ImageRef("http", http_server + "/huge.png"), config)) == "image_too_large"
    assert code(lambda: image_bytes(ImageRef("http", http_server + "/missing.png"), config)) == "image_fetch_failed"
    assert code(lambda: image_bytes(ImageRef("http", http_server + "/redirect"), config)) == "invalid_image_url"
