"""The shard stage's pure core: record checks, source inference, JSON/JSONL reading, image loading."""

import json

import pytest
from PIL import Image

from pipelines import storage
from pipelines.shard.records import sample_row
from pipelines.shard.stage import check_record, infer_source, iter_records, load_image
from synthetic.mixture import write_mixture


def _record(**kw):
    base = {"id": "r1", "image": "coco/train2017/x.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    base.update(kw)
    return base


def test_a_good_record_passes():
    assert check_record(0, _record()) is None
    text_only = _record(conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    del text_only["image"]
    assert check_record(0, text_only) is None


@pytest.mark.parametrize("record, reason", [
    ("not a dict", "malformed record"),
    ({"conversations": []}, "malformed record"),
    (_record(conversations=[]), "malformed conversation"),
    (_record(conversations=[{"from": "gpt", "value": "<image>\nx"}, {"from": "human", "value": "y"}]), "malformed conversation"),
    (_record(conversations=[{"from": "human", "value": "<image>\nx"}]), "malformed conversation"),
    (_record(conversations=[{"from": "gpt", "value": "Hi!"}]), "malformed conversation"),
    (_record(conversations=[{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]), "image without <image> tag"),
    ({k: v for k, v in _record().items() if k != "image"}, "<image> tag without image"),
    (_record(conversations=[{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}]), "misplaced <image> tag"),
    (_record(image=7), "malformed record"),
])
def test_bad_records_are_named_with_a_reason(record, reason):
    reject = check_record(5, record)
    assert reject is not None and reject.reason == reason and reject.index == 5
    assert reject.id == (record["id"] if isinstance(record, dict) and "id" in record else "#5")
    assert reject.detail


def test_records_llava_trains_on_are_kept_as_llava_trains_on_them():
    # A blank message, or a human turn of the image alone: LLaVA's template writes them and trains on the
    # conversation's replies.
    for turns in ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "y"}],
                  [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": " "},
                   {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "No."}]):
        assert check_record(0, _record(conversations=turns)) is None
        assert json.loads(sample_row(0, _record(conversations=turns), "k")["conversations"]) == turns
    # An empty reply merges its round with the next ("ASSISTANT:USER: ..."): the labels no longer follow
    # the turns, set aside by name (LLaVA trains the merged round's reply, or masks all on a mismatch).
    merged = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": ""},
              {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "No."}]
    assert check_record(0, _record(conversations=merged)).reason == "template conflict"
    # A first turn from gpt: LLaVA drops it (preprocess) and trains on the rest; the shards hold the rest.
    turns = [{"from": "gpt", "value": "Hello! How can I help?"}, {"from": "human", "value": "<image>\nA joke?"},
             {"from": "gpt", "value": "Why did the chicken cross the road?"}]
    assert check_record(0, _record(conversations=turns)) is None
    row = sample_row(0, _record(conversations=turns), "k")
    assert json.loads(row["conversations"]) == turns[1:] and row["source"] == "llava_instruct"


def test_sources_are_inferred_from_folder_and_prompt():
    def rec(image, question):
        r = _record(conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": "x"}])
        if image:
            r["image"] = image
        else:
            del r["image"]
        return r
    assert infer_source(rec(None, "Hi")) == "sharegpt"
    assert infer_source(rec("gqa/images/1.jpg", "<image>\nq")) == "gqa"
    assert infer_source(rec("ocr_vqa/images/1.jpg", "<image>\nq")) == "ocrvqa"
    assert infer_source(rec("textvqa/train_images/1.jpg", "<image>\nq")) == "textcaps"
    assert infer_source(rec("vg/VG_100K_2/1.jpg", "<image>\nq")) == "vg"
    assert infer_source(rec("coco/train2017/1.jpg", "<image>\nq\nAnswer with the option's letter from the given choices directly.")) == "aokvqa"
    assert infer_source(rec("coco/train2017/1.jpg", "<image>\nq\nAnswer the question using a single word or phrase.")) == "coco_vqa"
    assert infer_source(rec("coco/train2017/1.jpg", "<image>\nPlease provide the bounding box coordinate of the region")) == "refcoco"
    assert infer_source(rec("coco/train2017/1.jpg", "<image>\nWhat is happening here?")) == "llava_instruct"


def test_json_array_and_jsonl_read_the_same_records(tmp_path):
    records = [_record(id=f"r{i}") for i in range(3)]
    array = list(iter_records(json.dumps(records).encode(), "a.json"))
    lines = list(iter_records(("\n".join(json.dumps(r) for r in records) + "\n").encode(), "a.jsonl"))
    assert array == lines == list(enumerate(records))


def test_a_bad_jsonl_line_becomes_a_reject_and_a_bad_array_names_the_file():
    got = list(iter_records(b'{"id": "a", "conversations": []}\n{broken\n', "m.jsonl"))
    assert check_record(*got[1]).reason == "malformed record" and check_record(*got[1]).id == "#1"
    with pytest.raises(ValueError, match="m.json: not valid JSON"):
        list(iter_records(b"[{", "m.json"))


def test_load_image_reads_hashes_and_flags_bad_files(tmp_path):
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    ok = load_image(str(tmp_path), "ok.png")
    assert ok["error"] is None and (ok["width"], ok["height"]) == (30, 20) and len(ok["image_key"]) == 64
    assert load_image(str(tmp_path), "missing.jpg")["error"] == "missing file"
    assert load_image(str(tmp_path), "bad.jpg")["error"] == "unreadable image"
    assert load_image(str(tmp_path), "truncated.png")["error"] == "unreadable image"
    assert "truncated.png" in load_image(str(tmp_path), "truncated.png")["detail"]


def test_synthetic_mixture_has_the_real_layout(tmp_path):
    path = write_mixture(tmp_path, num_samples=400, num_images=60, seed=3)
    records = json.loads(path.read_text())
    assert len(records) <= 400 and len(records) >= 395
    assert all(check_record(i, r) is None for i, r in enumerate(records))
    sources = {infer_source(r) for r in records}
    assert sources >= {"sharegpt", "gqa", "ocrvqa", "textcaps", "vg", "aokvqa", "refcoco", "coco_vqa", "llava_instruct"}
    images = [r["image"] for r in records if "image" in r]
    assert len(set(images)) < len(images)  # images are shared
    assert all((tmp_path / "images" / p).exists() for p in images)
    for folder in ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2"):
        assert (tmp_path / "images" / folder).is_dir()
    assert any(len(r["conversations"]) > 2 for r in records)  # multi-turn
    again = write_mixture(tmp_path / "again", num_samples=400, num_images=60, seed=3)
    assert again.read_text() == path.read_text()


def test_a_literal_reply_separator_in_a_message_is_set_aside_with_the_reason():
    record = {"id": 5, "image": "coco/x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat does </s> mean?"}, {"from": "gpt", "value": "An end tag."}]}
    reject = check_record(3, record)
    assert reject is not None and reject.reason == "template conflict" and "</s>" in reject.detail
    assert (reject.index, reject.id) == (3, "5")


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "s3://elsewhere/x.jpg"])
def test_an_image_path_outside_the_root_is_set_aside_before_any_read(image):
    record = {"id": "r", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A file."}]}
    reject = check_record(0, record)
    assert reject is not None and reject.reason == "path outside image root" and image in reject.detail


@pytest.mark.parametrize("rows", [1, 3, 50])
def test_the_mixture_streams_in_runs_that_read_back_every_record_once(tmp_path, monkeypatch, rows):
    from pipelines.shard import mixture

    monkeypatch.setattr(mixture, "BLOCK_BYTES", 61)  # records straddle blocks
    records = [_record(id=i, extra="é ü \"]" * (i % 4)) for i in range(11)] + [7, "text", _record(image="vg/é.jpg")]
    array = tmp_path / "m.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    chunks, paths = mixture.scan_chunks(str(array), rows)
    assert paths == ["coco/train2017/x.jpg", "vg/é.jpg"]
    assert [c.first_index for c in chunks] == list(range(0, len(records), rows))
    assert [r for c in chunks for r in mixture.read_chunk(str(array), c)] == list(enumerate(records))
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines[2], lines[5] = "", "{broken"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(lines))
    chunks, paths = mixture.scan_chunks(str(jsonl), rows)
    assert paths == ["coco/train2017/x.jpg", "vg/é.jpg"]
    got = [r for c in chunks for r in mixture.read_chunk(str(jsonl), c)]
    assert [i for i, _ in got] == [i for i in range(len(records)) if i != 2]
    assert isinstance(dict(got)[5], json.JSONDecodeError) and dict(got)[0] == records[0]


def test_identical_bytes_are_stored_once_under_the_first_path_whatever_the_order():
    from pipelines.shard.image_index import ImageIndex

    k1, k2 = "1a" * 32, "2b" * 32
    found = [("b/2.jpg", k1, 0), ("a/1.jpg", k1, 0), ("c/3.jpg", k2, 0), ("d/4.jpg", "", 1)]
    indexes = []
    for order in (found, found[::-1]):
        index = ImageIndex()
        for path, key, bad in order:
            index.add(path, key, 4, 3, 10, "unreadable image" if bad else "", "detail" if bad else "")
        indexes.append(index)
    for index in indexes:
        assert index.owner[k1][0] == "a/1.jpg" and index.key_of["b/2.jpg"] == k1
        assert index.error_of == {"d/4.jpg": ("unreadable image", "detail")}
    assert indexes[0].buckets(1) == indexes[1].buckets(1)
    assert sum(len(b["keys"]) for b in indexes[0].buckets(1)) == 2  # one row per distinct content


# Identity: what makes a new version of the shards ------------------------------------------------


def _hash(image_root, paths, known=None):
    from pipelines.shard.image_index import ImageIndex, hash_image_batch

    out = hash_image_batch({"path": paths}, str(image_root), known)
    index = ImageIndex()
    for path, key, width, height, size, stamp, error, detail in zip(*(out[k] for k in (
            "path", "image_key", "width", "height", "size", "stamp", "error", "detail"))):
        index.add(path, key, width, height, size, error, detail, stamp)
    return index


def test_an_image_unchanged_since_the_last_index_is_not_read_again_and_a_changed_one_is(tmp_path):
    import os

    from pipelines.shard.image_index import INDEX_FILE, read_known

    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 5), (9, 9, 9)).save(tmp_path / "b.png")
    first = _hash(tmp_path, ["a.png", "b.png", "gone.png"])
    assert first.error_of["gone.png"][0] == "missing file"
    storage.write_parquet(str(tmp_path / INDEX_FILE), first.table())
    known = read_known(str(tmp_path))
    assert set(known) == {"a.png", "b.png"}  # the path that did not read is always tried again
    # A key known for an unchanged (size, stamp) is taken as it is: proof that the bytes were not read.
    planted = {path: (*entry[:2], "f" * 64, *entry[3:]) for path, entry in known.items()}
    assert _hash(tmp_path, ["a.png", "b.png"], planted).key_of == {"a.png": "f" * 64, "b.png": "f" * 64}
    Image.new("RGB", (8, 6), (200, 2, 3)).save(tmp_path / "a.png")  # new bytes, new stamp
    os.utime(tmp_path / "b.png", ns=(10**18, 10**18))  # only touched
    again = _hash(tmp_path, ["a.png", "b.png"], planted)
    assert again.key_of["a.png"] not in ("f" * 64, first.key_of["a.png"])
    assert again.key_of["b.png"] == first.key_of["b.png"]  # read again, same bytes


def _bmp(path, colour):
    """A 6 x 4 BMP: uncompressed, so every colour gives a file of the same size."""
    Image.new("RGB", (6, 4), colour).save(path, format="BMP")


def test_bytes_replaced_under_the_same_size_and_mtime_are_read_again(tmp_path):
    import os

    from pipelines.shard.image_index import INDEX_FILE, read_known

    _bmp(tmp_path / "img0.bmp", (1, 2, 3))
    first = _hash(tmp_path, ["img0.bmp"])
    storage.write_parquet(str(tmp_path / INDEX_FILE), first.table())
    known = read_known(str(tmp_path))
    before = os.stat(tmp_path / "img0.bmp")
    _bmp(tmp_path / "img0.bmp", (250, 2, 3))
    os.utime(tmp_path / "img0.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime put back
    after = os.stat(tmp_path / "img0.bmp")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = _hash(tmp_path, ["img0.bmp"], known)  # the inode change time moved: read again
    assert again.key_of["img0.bmp"] != first.key_of["img0.bmp"]
    assert again.digest() != first.digest()  # so the shards' identity, and their version, change


def test_an_image_whose_bytes_no_longer_hash_to_its_key_is_reported_not_written(tmp_path):
    from pipelines.shard.image_index import write_bucket_batch

    _bmp(tmp_path / "a.bmp", (1, 2, 3))
    _bmp(tmp_path / "b.bmp", (4, 5, 6))
    stale = _hash(tmp_path, ["a.bmp", "b.bmp"])
    _bmp(tmp_path / "b.bmp", (7, 8, 9))
    items = stale.buckets(10)  # one file
    batch = {k: [item[k] for item in items] for k in ("bucket", "keys", "paths", "widths", "heights")}
    out = tmp_path / "out"
    summary = write_bucket_batch(batch, str(tmp_path), str(out))
    assert summary["changed"] == ['["b.bmp"]'] and not out.exists()  # the driver reads it again
    fresh = _hash(tmp_path, ["a.bmp", "b.bmp"]).buckets(10)
    batch = {k: [item[k] for item in fresh] for k in ("bucket", "keys", "paths", "widths", "heights")}
    assert write_bucket_batch(batch, str(tmp_path), str(out))["changed"] == ["[]"] and out.exists()


def test_the_images_digest_follows_content_added_and_missing_images_not_stamps(tmp_path):
    import os

    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "a.png")
    before = _hash(tmp_path, ["a.png", "later.png"]).digest()
    os.utime(tmp_path / "a.png", ns=(10**18, 10**18))
    assert _hash(tmp_path, ["a.png", "later.png"]).digest() == before  # touched: the same images
    Image.new("RGB", (4, 4)).save(tmp_path / "later.png")
    added = _hash(tmp_path, ["a.png", "later.png"]).digest()
    assert added != before  # an image that was missing is there now
    Image.new("RGB", (8, 6), (1, 2, 4)).save(tmp_path / "a.png")
    assert _hash(tmp_path, ["a.png", "later.png"]).digest() not in (before, added)


def test_the_identity_holds_the_mixtures_size_and_content_and_the_knobs_that_change_the_output(tmp_path):
    from pipelines.config import ShardConfig
    from pipelines.manifests import version_of
    from pipelines.shard.stage import base_identity

    mixture = tmp_path / "m.json"
    mixture.write_text(json.dumps([_record()]))
    digest = storage.sha256(str(mixture))
    cfg = ShardConfig(rows_per_shard=50)
    base = version_of(base_identity(str(mixture), digest, "images", cfg))
    same_output = ShardConfig(rows_per_shard=50, concurrency=7, read_batch_size=3, keep_versions=5)
    assert version_of(base_identity(str(mixture), digest, "images", same_output)) == base
    for other in (ShardConfig(rows_per_shard=51), ShardConfig(rows_per_shard=50, images_per_shard=3)):
        assert version_of(base_identity(str(mixture), digest, "images", other)) != base
    assert version_of(base_identity(str(mixture), digest, "other-images", cfg)) != base
    mixture.write_text(json.dumps([_record(id="r2")]))  # the same size, other bytes
    assert version_of(base_identity(str(mixture), storage.sha256(str(mixture)), "images", cfg)) != base
