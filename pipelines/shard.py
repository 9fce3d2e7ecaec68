"""Stage 1, shard: LLaVA's mixture JSON + image folders into Parquet shards.

Output, under `shards/`:
  samples-NNNNN.parquet  one row per kept sample: index, id, source, image_path, image_key, conversations
  images-NNNNN.parquet   one row per distinct image (by content hash): image_key, bytes, width, height
  rejects.parquet        one row per record set aside: index, id, reason, detail
  manifest.json          counts per source and per reject reason, the input, the config
The pure core checks records and reads images; Ray Data reads and hashes the images in parallel while
the driver streams them, deduplicated, into shards (memory holds one batch of image bytes at a time).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.config import ShardConfig
from pipelines.images import OUTSIDE_ROOT, escapes_root, load_image
from pipelines.manifests import ShardsManifest
from trim.conversation import template_conflict

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
MANIFEST_VERSION = 1


@dataclass
class Reject:
    """A record set aside, and why."""

    index: int
    id: str
    reason: str
    detail: str


# Pure core: records ----------------------------------------------------------------------------


def iter_records(data: bytes, name: str) -> Iterator[tuple[int, Any]]:
    """(index, record) of a JSON array (as LLaVA ships it) or of JSONL. A line of JSONL that does
    not parse is yielded as an exception object, so it becomes a reject instead of stopping the job."""
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        try:
            records = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: not valid JSON ({err})") from err
        del data
        # Hand records over one by one, dropping each from the list: the parsed mixture shrinks as
        # the (smaller) sample rows grow, instead of both being held whole.
        records.reverse()
        index = 0
        while records:
            yield index, records.pop()
            index += 1
        return
    for index, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as err:
            yield index, err


def check_record(index: int, record: Any) -> Reject | None:
    """Why a record cannot be used (None if it can): structure, turns, the <image> tag."""
    if isinstance(record, Exception):
        return Reject(index, f"#{index}", "malformed record", f"line does not parse: {record}")
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
        return Reject(index, f"#{index}", "malformed record", "not an object with an id")
    rid = str(record["id"])
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return Reject(index, rid, "malformed conversation", "no conversations list")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            return Reject(index, rid, "malformed conversation",
                          f"turn {i} is not a {expected!r} turn with a text value")
        if not turn["value"].replace(IMAGE_TAG, "").strip():
            return Reject(index, rid, "empty turn", f"turn {i} ({expected}) is empty")
    if len(turns) % 2:
        return Reject(index, rid, "malformed conversation", "the last human turn has no answer")
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in turns)
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        return Reject(index, rid, "malformed record", f"image is not a path: {image!r}")
    if image and tags == 0:
        return Reject(index, rid, "image without <image> tag", f"image {image} but no {IMAGE_TAG} in any turn")
    if not image and tags:
        return Reject(index, rid, "<image> tag without image", f"{tags} {IMAGE_TAG} tag(s) but no image field")
    if image and escapes_root(image):
        return Reject(index, rid, OUTSIDE_ROOT, escapes_root(image) or "")
    if tags > 1 or (tags == 1 and IMAGE_TAG not in turns[0]["value"]):
        return Reject(index, rid, "misplaced <image> tag", f"{tags} tag(s); expected one, in the first human turn")
    conflict = template_conflict(turns)  # LLaVA would train on it with every label masked
    if conflict:
        return Reject(index, rid, "template conflict", conflict)
    return None


def infer_source(record: dict) -> str:
    """Which part of the 665K mixture a record comes from. The JSON has no source field, so it is read
    off the image folder and the prompt style (VQAv2 and OK-VQA share both: "coco_vqa")."""
    image = record.get("image")
    if not image:
        return "sharegpt"
    first = record["conversations"][0]["value"]
    for prefix, source in (("gqa/", "gqa"), ("ocr_vqa/", "ocrvqa"), ("textvqa/", "textcaps"), ("vg/", "vg")):
        if image.startswith(prefix):
            return source
    if "option's letter" in first:
        return "aokvqa"
    if "bounding box" in first or "short description for this region" in first:
        return "refcoco"
    if "single word or phrase" in first:
        return "coco_vqa"
    return "llava_instruct"


# Pure core: images -----------------------------------------------------------------------------


def load_image_batch(batch: dict[str, Any], image_root: str) -> dict[str, list]:
    """Ray Data map_batches function over {"path": [...]}. Empty strings/bytes stand for "none", so
    every column keeps one Arrow type whatever mix of good and bad images a batch holds."""
    rows = [load_image(image_root, p) for p in batch["path"]]
    return {k: [r[k] if r[k] is not None else (b"" if k == "bytes" else "") for r in rows] for k in rows[0]}


# Ray wrapper ----------------------------------------------------------------------------------

SAMPLE_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("image_path", pa.string()),
    ("image_key", pa.string()), ("conversations", pa.string()),
])
IMAGE_SCHEMA = pa.schema([("image_key", pa.string()), ("bytes", pa.binary()), ("width", pa.int32()),
                          ("height", pa.int32())])
REJECT_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
IMAGE_ROW_GROUP = 16  # small row groups: precompute fetches images by key


def _input_fingerprint(mixture: str, image_root: str, cfg: ShardConfig) -> dict:
    fs, path = storage.fsspec_fs(mixture)
    info = fs.info(path)
    return {"mixture": mixture, "size": info.get("size"), "etag_or_mtime": str(info.get("ETag") or info.get("mtime")),
            "image_root": image_root, "config": asdict(cfg), "version": MANIFEST_VERSION}


def run_shard(mixture: str, image_root: str, out: str, cfg: ShardConfig) -> ShardsManifest:
    """Shard the mixture; skip if `out` already holds a manifest of the same input and config."""
    fingerprint = _input_fingerprint(mixture, image_root, cfg)
    previous = ShardsManifest.read_if_exists(out)
    if previous is not None and previous.input == fingerprint:
        logger.info("%s is already complete for this input; nothing to do", out)
        return previous
    started = time.time()
    samples, rejects = _read_records(mixture)
    logger.info("%d records read, %d set aside so far", len(samples) + len(rejects), len(rejects))
    storage.makedirs(out)
    images = _store_images(sorted({s["image_path"] for s in samples if s["image_path"]}), image_root, out, cfg)
    kept = []
    for sample in samples:
        path = sample["image_path"]
        if path and path in images.error_of:
            rejects.append(Reject(sample["index"], sample["id"], *images.error_of[path]))
            continue
        sample["image_key"] = images.key_of.get(path) if path else None
        kept.append(sample)
    for i in range(0, max(len(kept), 1), cfg.rows_per_shard):
        table = pa.Table.from_pylist(kept[i:i + cfg.rows_per_shard], schema=SAMPLE_SCHEMA)
        storage.write_parquet(storage.join(out, f"samples-{i // cfg.rows_per_shard:05d}.parquet"), table)
    rejects.sort(key=lambda r: r.index)
    storage.write_parquet(storage.join(out, "rejects.parquet"),
                          pa.Table.from_pylist([asdict(r) for r in rejects], schema=REJECT_SCHEMA))
    manifest = ShardsManifest(
        input=fingerprint, samples=len(kept), rejects=len(rejects), images=images.count,
        image_bytes=images.bytes, image_files=images.files, per_source=_count(s["source"] for s in kept),
        per_reject_reason=_count(r.reason for r in rejects), seconds=round(time.time() - started, 2))
    manifest.write(out)
    logger.info("%d samples, %d distinct images, %d rejects -> %s", len(kept), images.count, len(rejects), out)
    return manifest


def _read_records(mixture: str) -> tuple[list[dict], list[Reject]]:
    """The mixture's records checked: (sample rows, rejects). A sample is its position (index)."""
    samples: list[dict] = []
    rejects: list[Reject] = []
    for index, record in iter_records(storage.read_bytes(mixture), mixture):
        problem = check_record(index, record)
        if problem:
            rejects.append(problem)
            continue
        samples.append({"index": index, "id": str(record["id"]), "source": infer_source(record),
                        "image_path": record.get("image"), "image_key": None,
                        "conversations": json.dumps(record["conversations"], ensure_ascii=False)})
    return samples, rejects


@dataclass
class StoredImages:
    """What _store_images wrote and found."""

    key_of: dict[str, str] = field(default_factory=dict)
    """Image path -> content key, for the images that read."""
    error_of: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Image path -> (reason, detail), for those that did not."""
    count: int = 0
    """Distinct images stored."""
    bytes: int = 0
    """Their bytes."""
    files: int = 0
    """images-NNNNN.parquet files written."""


def _store_images(paths: list[str], image_root: str, out: str, cfg: ShardConfig) -> StoredImages:
    """Ray Data reads and hashes the images in parallel while the driver streams them, deduplicated by
    content, into image shards (memory holds one batch of image bytes at a time)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shards: a rerun writes the same files
    dataset = ray.data.from_items([{"path": p} for p in paths]).map_batches(
        load_image_batch,  # type: ignore[arg-type]  # image_root comes through fn_kwargs
        fn_kwargs={"image_root": image_root}, batch_size=cfg.read_batch_size,
        concurrency=cfg.concurrency, batch_format="default")
    stored = StoredImages()
    seen: set[str] = set()
    buffer: list[dict] = []

    def flush() -> None:
        if buffer:
            table = pa.Table.from_pylist(buffer, schema=IMAGE_SCHEMA)
            storage.write_parquet(storage.join(out, f"images-{stored.files:05d}.parquet"), table, IMAGE_ROW_GROUP)
            stored.files += 1
            buffer.clear()

    for batch in dataset.iter_batches(batch_size=cfg.read_batch_size, batch_format="default"):
        for path, key, data, width, height, error, detail in zip(
                batch["path"], batch["image_key"], batch["bytes"], batch["width"], batch["height"], batch["error"],
                batch["detail"]):
            if error:
                stored.error_of[path] = (error, detail)
                continue
            stored.key_of[path] = key
            if key in seen:  # the same bytes under another name: stored once
                continue
            seen.add(key)
            stored.bytes += len(data)
            buffer.append({"image_key": key, "bytes": data, "width": width, "height": height})
            if len(buffer) >= cfg.images_per_shard:
                flush()
    flush()
    stored.count = len(seen)
    return stored


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))
