"""Shard's records: each record of the mixture checked (structure, turns, the <image> tag, the image
path) and turned into a sample row, and the workers' functions over runs of records (pure given
their inputs: a run in, files and a small summary out)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.images import BAD_PATH, OUTSIDE_ROOT, escapes_root, unusable_path
from pipelines.shard.json_text import json_type
from pipelines.shard.mixture import Chunk, read_chunk
from trim.conversation import template_conflict

IMAGE_TAG = "<image>"
MAX_ID_CHARS = 1000
"""Longer ids are set aside: LLaVA's are a few dozen characters; thousands are a mistake (a record
pasted into its id), copied into every row and log line that names the sample."""
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Reject:
    """A record set aside, and why."""

    index: int
    id: str
    reason: str
    detail: str


# Pure core: records ----------------------------------------------------------------------------


def llava_turns(turns: Any) -> Any:
    """The turns LLaVA trains on: a first turn from gpt is dropped (llava/train/train.py, preprocess:
    a source that does not begin with the human role loses its first message); anything else as it is.
    A blank message stays (LLaVA's template writes it as any other and trains on the reply); an empty one
    is written "ROLE:" and merges its round with the next (check_record names it a template conflict)."""
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("from") == "gpt":
        return turns[1:]
    return turns


def check_record(index: int, record: Any) -> Reject | None:
    """Why a record cannot be used (None if it can): its text, its id, its turns (those LLaVA trains
    on: llava_turns), the <image> tag and the image path."""
    if isinstance(record, UnicodeDecodeError):
        return Reject(index, _id_through(record.object, index), "invalid UTF-8",
                      f"bytes that are not UTF-8 ({record.reason} at byte {record.start} of the record)")
    if isinstance(record, Exception):
        return Reject(index, f"#{index}", "malformed record", f"does not parse: {record}")
    if not isinstance(record, dict):
        shown = json.dumps(record, ensure_ascii=False)[:80] if not isinstance(record, (list, dict)) else \
            f"{repr(record)[:80]}"
        return Reject(index, f"#{index}", "malformed record", f"not an object but JSON {json_type(record)}: {shown}")
    problem = _id_problem(record.get("id"))
    if problem:  # the id cannot name the record: its position does
        return Reject(index, f"#{index}", "malformed record", problem)
    where = _surrogate_in({k: record.get(k) for k in ("id", "image", "conversations")})
    if where:  # not Unicode text: it cannot be written, tokenized or shown
        shown = f" ({ascii(record['id'])[:80]})" if where == "id" else ""
        return Reject(index, f"#{index}" if where == "id" else str(record["id"]), "lone surrogate",
                      f"{where}{shown} holds a lone surrogate (a \\ud800-\\udfff escape without its pair)")
    rid = str(record["id"])
    turns = llava_turns(record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        return Reject(index, rid, "malformed conversation", "no conversations list, or only a gpt turn")
    for i, turn in enumerate(turns):
        problem = _turn_problem(i, turn)
        if problem:
            return Reject(index, rid, "malformed conversation", problem)
    if len(turns) % 2:  # LLaVA masks such a sample whole (its rounds no longer add up: a mismatch)
        return Reject(index, rid, "malformed conversation", "the last human turn has no answer")
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in turns)
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        return Reject(index, rid, "malformed record", f"image is not a path: {image!r}")
    if image and tags == 0:
        return Reject(index, rid, "image without <image> tag", f"image {image} but no {IMAGE_TAG} in any turn")
    if not image and tags:
        return Reject(index, rid, "<image> tag without image", f"{tags} {IMAGE_TAG} tag(s) but no image field")
    if image and unusable_path(image):
        return Reject(index, rid, BAD_PATH, unusable_path(image) or "")
    if image and escapes_root(image):
        return Reject(index, rid, OUTSIDE_ROOT, escapes_root(image) or "")
    if tags > 1 or (tags == 1 and IMAGE_TAG not in turns[0]["value"]):
        return Reject(index, rid, "misplaced <image> tag", f"{tags} tag(s); expected one, in the first human turn")
    conflict = template_conflict(turns)  # LLaVA would train on it with every label masked
    if conflict:
        return Reject(index, rid, "template conflict", conflict)
    return None


def _id_through(data: Any, index: int) -> str:
    """The id of a record whose bytes are not all UTF-8, read past the bad bytes, or "#index"."""
    try:
        record = json.loads(bytes(data).decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return f"#{index}"
    rid = record.get("id") if isinstance(record, dict) else None
    return f"#{index}" if _id_problem(rid) else str(rid)


def _id_problem(rid: Any) -> str | None:
    """What is wrong with a record's id, or None: a string or an integer, not empty, not huge."""
    if rid is None:
        return "no id"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"the id is a JSON {json_type(rid)}, not a string or an integer: {repr(rid)[:80]}"
    if isinstance(rid, str) and not rid.strip():
        return f"the id is empty: {rid!r}"
    if len(str(rid)) > MAX_ID_CHARS:
        return f"the id is {len(str(rid))} characters long (at most {MAX_ID_CHARS}): {str(rid)[:40]!r}..."
    return None


def _turn_problem(i: int, turn: Any) -> str | None:
    """What is wrong with the i-th turn (human turns first, then alternating with gpt), or None."""
    expected = "human" if i % 2 == 0 else "gpt"
    if not isinstance(turn, dict):
        return f"turn {i} is a {type(turn).__name__}, not an object"
    if turn.get("from") != expected:
        return f"turn {i} is from {repr(turn.get('from'))[:60]}; expected {expected!r} (human first, then alternating)"
    if "value" not in turn:
        return f"turn {i} ({expected}) has no value"
    if not isinstance(turn["value"], str):
        return f"turn {i} ({expected}) has a value of type {type(turn['value']).__name__}, not text"
    return None


def _surrogate_in(value: Any) -> str | None:
    """Where in value (a JSON value) a string or key holds a lone surrogate, or None. A walk with its
    own stack: a value nested as deep as the JSON reader allows is still walked."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        inner = []
        for key, child in pairs:
            if isinstance(key, str) and _SURROGATE.search(key):
                return f"a key of {where or 'the record'}"
            inner.append((f"{where}.{key}".lstrip(".") if isinstance(key, str) else f"{where}[{key}]", child))
        stack += reversed(inner)  # depth first, in order: the first one found is named
    return None


def infer_source(record: dict) -> str:
    """Which part of the 665K mixture a record comes from. The JSON has no source field, so it is read
    off the image folder and the prompt style (VQAv2 and OK-VQA share both: "coco_vqa")."""
    image = record.get("image")
    if not image:
        return "sharegpt"
    first = llava_turns(record["conversations"])[0]["value"]
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


def samples_file(number: int) -> str:
    """The samples file of the number-th run of records."""
    return f"samples-{number:05d}.parquet"


def sample_row(index: int, record: dict, image_key: str | None) -> dict:
    turns = llava_turns(record["conversations"])  # what LLaVA trains on is what the shards hold
    return {"index": index, "id": str(record["id"]), "source": infer_source(record), "image_path": record.get("image"),
            "image_key": image_key, "conversations": json.dumps(turns, ensure_ascii=False)}


def sort_run(mixture: str, chunk: Chunk, key_of: dict[str, str],
             error_of: dict[str, tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """The pure core of one run: its records read and checked, the kept ones as sample rows with their
    image keys (key_of: path -> content key, error_of: path -> why its image did not read), the others
    as reject rows whose detail names the mixture file, the record and its id."""
    kept, rejects = [], []
    for index, record in read_chunk(mixture, chunk):
        problem = check_record(index, record) or _image_problem(index, record, key_of, error_of)
        if problem:
            place = f"line {index + 1}" if chunk.jsonl else f"record #{index}"
            problem.detail = f"{mixture} {place} (id {problem.id[:80]!r}): {problem.detail}"
            rejects.append(asdict(problem))
            continue
        path = record.get("image")
        kept.append(sample_row(index, record, key_of[path] if path else None))
    return kept, rejects


def _image_problem(index: int, record: dict, key_of: dict[str, str],
                   error_of: dict[str, tuple[str, str]]) -> Reject | None:
    path = record.get("image")
    if not path or path in key_of:
        return None
    if path in error_of:
        return Reject(index, str(record["id"]), *error_of[path])
    return Reject(index, str(record["id"]), "unreadable file", f"image {path} was not read by the image pass")


def write_chunk_batch(batch: dict[str, Any], mixture: str, out: str, index_ref: Any) -> dict[str, list]:
    """Ray Data map_batches function over runs of the mixture: each run parsed and checked, its samples
    given their image keys (a sample whose image did not read becomes a reject) and written as
    samples-NNNNN.parquet, its rejects under _work/; returns counts and the image keys it uses."""
    key_of, error_of = index_ref if isinstance(index_ref, tuple) else _index(index_ref)
    summary: dict[str, list] = {"chunk": [], "kept": [], "counts": [], "keys": []}
    for fields in _chunks(batch):
        kept, rejects = sort_run(mixture, fields, key_of, error_of)
        storage.write_parquet(storage.join(out, samples_file(fields.number)),
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
