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

    from pipelines.images import IMAGE_LAYOUT, ImageStore, bucket_of
    from pipelines.manifests import ShardsManifest
    from pipelines.shard_images import ImageIndex, write_bucket_batch

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
