"""Reading images: paths stay inside the image root (text and symlinks), bad files are named."""

import io

import pytest
from PIL import Image

from pipelines.images import OUTSIDE_ROOT, OutsideRoot, escapes_root, load_image, read_image, resolve


def _png(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("relpath", ["../secret.png", "coco/../../secret.png", "/etc/passwd", "s3://other/x.jpg",
                                     "C:/x.jpg", "\\\\server\\share\\x.jpg", "coco\\..\\..\\x.jpg", ""])
def test_paths_that_leave_the_root_are_named(relpath):
    assert escapes_root(relpath)


@pytest.mark.parametrize("relpath", ["coco/train2017/000000033471.jpg", "vg/VG_100K/1.jpg", "a..b/c.jpg"])
def test_ordinary_relative_paths_pass(relpath):
    assert escapes_root(relpath) is None


def test_a_symlink_out_of_the_root_is_set_aside_and_never_read(tmp_path):
    root = tmp_path / "images"
    _png(tmp_path / "outside" / "secret.png")
    _png(root / "coco" / "ok.png")
    (root / "coco" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (root / "inside-link.png").symlink_to(root / "coco" / "ok.png")  # a link that stays inside is fine
    row = load_image(str(root), "coco/link.png")
    assert row["error"] == OUTSIDE_ROOT and "coco/link.png" in row["detail"] and row["bytes"] is None
    assert load_image(str(root), "inside-link.png")["error"] is None
    assert load_image(str(root), "coco/ok.png")["width"] == 8
    with pytest.raises(OutsideRoot):
        read_image(str(root), "coco/link.png")
    with pytest.raises(OutsideRoot):
        read_image(str(root), "../outside/secret.png")


def test_an_s3_root_refuses_escaping_paths_before_any_request():
    with pytest.raises(OutsideRoot, match=r"'\.\.'"):
        resolve("s3://bucket/images", "../other-bucket/x.jpg")
    assert resolve("s3://bucket/images", "coco/x.jpg") == "s3://bucket/images/coco/x.jpg"
    row = load_image("s3://bucket/images", "/etc/passwd")
    assert row["error"] == OUTSIDE_ROOT


def test_the_image_store_fetches_one_image_by_its_key_from_the_bucket_layout(tmp_path):
    import hashlib

    from pipelines.image_store import IMAGE_LAYOUT, ImageStore, bucket_of
    from pipelines.manifests import ShardsManifest
    from pipelines.shard.image_index import ImageIndex, write_bucket_batch

    index = ImageIndex()
    for n in range(7):
        _png(tmp_path / "images" / f"{n}.png", size=(8 + n, 6))
        data = (tmp_path / "images" / f"{n}.png").read_bytes()
        index.add(f"{n}.png", hashlib.sha256(data).hexdigest(), 8 + n, 6, len(data), "", "")
    buckets = index.buckets(images_per_file=3)
    for bucket in buckets:
        write_bucket_batch({k: [v] for k, v in bucket.items()}, str(tmp_path / "images"), str(tmp_path / "shards"))
    ShardsManifest(input={}, samples=0, rejects=0, images=7, image_bytes=0, image_files=len(buckets),
                   image_layout=IMAGE_LAYOUT).write(str(tmp_path / "shards"))
    store = ImageStore(str(tmp_path / "shards"))
    for path, key in index.key_of.items():
        assert store.get(key) == (tmp_path / "images" / path).read_bytes()
        assert key in bucket_of_keys(buckets, bucket_of(key, len(buckets)))
    with pytest.raises(KeyError):
        store.get("0" * 64)


def bucket_of_keys(buckets, number):
    return next(b["keys"] for b in buckets if b["bucket"] == number)


def test_a_transient_s3_failure_is_retried_with_growing_waits_then_read():
    from pipelines.images import read_with_retries

    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(121, "InternalError: We encountered an internal error. Please try again.")
        return b"bytes"

    assert read_with_retries(flaky, "s3://b/x.jpg", tries=4, backoff_s=0.5, sleep=waits.append) == b"bytes"
    assert len(calls) == 3 and len(waits) == 2
    assert 0.5 <= waits[0] < 1.0 <= waits[1] < 2.0  # doubling, with jitter


def test_a_persistent_s3_failure_gives_up_after_the_tries_and_a_missing_object_at_once():
    from pipelines.images import FileProblem, read_with_retries

    def failing(err):
        calls = []

        def read():
            calls.append(1)
            raise err
        return read, calls

    read, calls = failing(ConnectionError("Connection was closed before we received a valid response"))
    with pytest.raises(FileProblem, match="tried 4 times") as caught:
        read_with_retries(read, "s3://b/x.jpg", tries=4, sleep=lambda s: None)
    assert caught.value.reason == "unreadable file" and len(calls) == 4
    for err, reason in ((FileNotFoundError("b/x.jpg"), "missing file"), (PermissionError("AccessDenied"),
                                                                          "unreadable file")):
        read, calls = failing(err)
        with pytest.raises(FileProblem) as caught:
            read_with_retries(read, "s3://b/x.jpg", tries=4, sleep=lambda s: None)
        assert caught.value.reason == reason and len(calls) == 1


def test_an_s3_image_that_keeps_failing_is_set_aside_not_raised(monkeypatch):
    from pipelines import images, storage

    tries = []

    def unavailable(uri):
        tries.append(uri)
        raise OSError(121, "ServiceUnavailable")

    monkeypatch.setattr(storage, "read_bytes", unavailable)
    monkeypatch.setattr(images, "S3_BACKOFF_S", 0.0)
    row = load_image("s3://bucket/images", "coco/x.jpg")
    assert row["error"] == "unreadable file" and "s3://bucket/images/coco/x.jpg" in row["detail"]
    assert "tried 4 times" in row["detail"] and tries == ["s3://bucket/images/coco/x.jpg"] * 4


def test_only_regular_files_are_read(tmp_path):
    import os

    from pipelines.images import FileProblem, read_file

    (tmp_path / "dir.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    _png(tmp_path / "ok.png")
    assert read_file(str(tmp_path / "ok.png")) == (tmp_path / "ok.png").read_bytes()
    for name, kind in (("dir.jpg", "a directory"), ("pipe.jpg", "a named pipe")):
        with pytest.raises(FileProblem, match=f"is {kind}, not a regular file") as caught:
            read_file(str(tmp_path / name))
        assert caught.value.reason == "not a regular file"
    with pytest.raises(FileProblem, match="does not exist"):
        read_file(str(tmp_path / "ok.png" / "below.png"))
