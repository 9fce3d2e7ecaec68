"""Shard's records: each record of the mixture checked (structure, turns, the <image> tag, the image
path) and turned into a sample row, and the workers' functions over runs of records (pure given
their inputs: a run in, files and a small summary out)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.images import OUTSIDE_ROOT, escapes_root
from pipelines.mixture import Chunk, read_chunk
from trim.conversation import template_conflict

IMAGE_TAG = "<image>"


@dataclass
class Reject:
    """A record set aside, and why."""

    index: int
    id: str
    reason: str
    detail: str


# Pure core: records ----------------------------------------------------------------------------


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


# Workers' functions (pure given their inputs) ---------------------------------------------------

SAMPLE_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("image_path", pa.string()),
    ("image_key", pa.string()), ("conversations", pa.string()),
])
REJECT_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
WORK = "_work"
"""Sub-folder of the output for each run's rejects, gathered into rejects.parquet at the end."""


def sample_row(index: int, record: dict, image_key: str | None) -> dict:
    return {"index": index, "id": str(record["id"]), "source": infer_source(record), "image_path": record.get("image"),
            "image_key": image_key, "conversations": json.dumps(record["conversations"], ensure_ascii=False)}


def write_chunk_batch(batch: dict[str, Any], mixture: str, out: str, index_ref: Any) -> dict[str, list]:
    """Ray Data map_batches function over runs of the mixture: each run parsed and checked, its samples
    given their image keys (a sample whose image did not read becomes a reject) and written as
    samples-NNNNN.parquet, its rejects under _work/; returns counts and the image keys it uses."""
    key_of, error_of = index_ref if isinstance(index_ref, tuple) else _index(index_ref)
    summary: dict[str, list] = {"chunk": [], "kept": [], "counts": [], "keys": []}
    for fields in _chunks(batch):
        kept, rejects = [], []
        for index, record in read_chunk(mixture, fields):
            problem = check_record(index, record)
            path = record.get("image") if not problem else None
            if not problem and path and path in error_of:
                problem = Reject(index, str(record["id"]), *error_of[path])
            if problem:
                rejects.append(asdict(problem))
                continue
            kept.append(sample_row(index, record, key_of[path] if path else None))
        storage.write_parquet(storage.join(out, f"samples-{fields.number:05d}.parquet"),
                              pa.Table.from_pylist(kept, schema=SAMPLE_SCHEMA))
        storage.write_parquet(storage.join(out, WORK, f"rejects-{fields.number:05d}.parquet"),
                              pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        counts = {"source": Counter(s["source"] for s in kept), "reason": Counter(r["reason"] for r in rejects)}
        summary["chunk"].append(fields.number)
        summary["kept"].append(len(kept))
        summary["counts"].append(json.dumps(counts))
        summary["keys"].append(sorted({s["image_key"] for s in kept if s["image_key"]}))
    return summary


_INDEX_CACHE: dict[Any, tuple[dict, dict]] = {}


def _index(ref: Any) -> tuple[dict, dict]:
    """The driver's path -> key / error maps, fetched once per worker process from the object store."""
    import ray

    key = ref.hex()
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = ray.get(ref)
    return _INDEX_CACHE[key]


def _chunks(batch: dict[str, Any]) -> list[Chunk]:
    names = ("number", "start", "end", "first_index", "count", "jsonl")
    return [Chunk(*(type_(v) for type_, v in zip((int, int, int, int, int, bool), values)))
            for values in zip(*(batch[n] for n in names))]
