"""Precompute's units of work, each one cache part with a deterministic name, and the CPU functions
that gather a unit's samples and image bytes from the shards.

Per-sample TRIM (every preset but `official`): the samples are grouped by the images file their image
hashes to (Ray Data groupby, samples only: no image bytes move), then each file's samples are sorted
by (image, index) and cut into units of about rows_per_file samples at image boundaries, so each
distinct image is encoded once; the worker reads the images of its units from that one file.
Text-only samples go into their own units, by position. Parts: part-iBBBBB-KKK, part-tNNNNN.

Batch-wide IQR (`official`): a unit is a run of consecutive samples in mixture order, a whole number
of groups of TrimConfig.batch_group_size (text-only samples included: they score the zero image in
their group's IQR, as the released training's dummy image); images are fetched by key. Parts: part-oNNNNN.
A sample is its position in the mixture (`index`) everywhere: ids repeat in LLaVA's file.

The shards are read through their manifest (read_shards): the current version's folder, and in it only
the files the manifest lists, each checked for its rows first.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.image_store import IMAGE_LAYOUT, ImageStore, bucket_of, images_file
from pipelines.manifests import ShardsManifest, check_files, resolve_output

TEXT_SPAN = 8
"""Text-only samples are ~6% of LLaVA's mixture: their units span TEXT_SPAN x rows_per_file positions."""
SAMPLE_COLUMNS = ["index", "id", "source", "image_key", "conversations"]
UNIT_SCHEMA = pa.schema([("part", pa.string()), ("samples", pa.string()), ("images", pa.list_(pa.binary()))])
"""A unit as the gathering stage hands it on: its part, its samples (JSON: the sample's fields plus
"image", its row in images or -1, and "group", its IQR group or -1) and its images' bytes."""


def read_shards(shards: str) -> tuple[str, ShardsManifest]:
    """(version folder, manifest) of the complete shards at `shards` (a root or a version folder),
    every file the manifest lists checked for its rows."""
    folder = resolve_output(shards)
    manifest = ShardsManifest.read(folder)
    if manifest.image_layout != IMAGE_LAYOUT:
        raise ValueError(f"{folder} was written by an older shard stage (images not in hash buckets); run shard again")
    check_files(folder, manifest.files, "shard")
    images = sorted(n for n in manifest.files if n.startswith("images-"))
    if images != [images_file(b) for b in range(manifest.image_files)]:
        raise ValueError(f"{folder}: the shard manifest records {manifest.image_files} images files but lists "
                         f"{len(images)}; run shard again")
    return folder, manifest


def sample_files(manifest: ShardsManifest) -> list[tuple[str, int]]:
    """(name, rows) of the samples files a shards manifest lists, in mixture order."""
    return sorted((n, rows) for n, rows in manifest.files.items() if n.startswith("samples-"))


def unit_key_batch(batch: pa.Table, files: int, rows_per_file: int) -> pa.Table:
    """Ray Data map_batches function: each sample's unit key, the images file of its image (>= 0) or,
    for a text-only sample, -1 - its span of positions."""
    keys = [bucket_of(k, files) if k else -1 - i // (rows_per_file * TEXT_SPAN)
            for k, i in zip(batch.column("image_key").to_pylist(), batch.column("index").to_pylist())]
    return batch.append_column("unit", pa.array(keys, type=pa.int64()))


def read_samples_batch(batch: pa.Table, shards: str, files: int, rows_per_file: int) -> pa.Table:
    """Ray Data map_batches function over samples file names: their rows (no image bytes) with unit keys.
    (A plain task per file: Ray's own Parquet reader starts dozens of footer-reading actors first.)"""
    tables = [storage.read_parquet(storage.join(shards, name), columns=SAMPLE_COLUMNS)
              for name in batch.column("name").to_pylist()]
    return unit_key_batch(pa.concat_tables(tables), files, rows_per_file)


def split_by_image(samples: list[dict], rows_per_file: int) -> list[list[dict]]:
    """Samples of one images file, sorted by (image, index), cut into runs of at least rows_per_file
    samples (the last may be shorter) without splitting an image's samples."""
    ordered = sorted(samples, key=lambda s: (s["image_key"], s["index"]))
    runs: list[list[dict]] = []
    for i, sample in enumerate(ordered):
        new_image = i == 0 or sample["image_key"] != ordered[i - 1]["image_key"]
        if not runs or (new_image and len(runs[-1]) >= rows_per_file):
            runs.append([])
        runs[-1].append(sample)
    return runs


def _unit_row(part: str, samples: list[dict], images: list[bytes]) -> dict[str, Any]:
    return {"part": part, "samples": json.dumps(samples, ensure_ascii=False), "images": images}


def _with_images(samples: list[dict]) -> tuple[list[dict], list[str]]:
    """The samples with "image" (their row among the unit's distinct images) and the images' keys."""
    keys: dict[str, int] = {}
    out = []
    for sample in samples:
        key = sample["image_key"]
        image = keys.setdefault(key, len(keys)) if key else -1
        out.append({**{k: sample[k] for k in SAMPLE_COLUMNS}, "image": image, "group": sample.get("group", -1)})
    return out, list(keys)


def gather_group(batch: pa.Table, shards: str, files: int, rows_per_file: int, done: list[str]) -> pa.Table:
    """Ray Data map_groups function over the samples of one unit key: the key's units not yet
    written, each with its images read from the key's images file (only the rows it needs)."""
    samples = sorted(batch.select(SAMPLE_COLUMNS + ["unit"]).to_pylist(), key=lambda s: s["index"])
    key = samples[0]["unit"]
    if key < 0:
        units = [(f"part-t{-1 - key:05d}.parquet", samples)]
    else:
        runs = split_by_image(samples, rows_per_file)
        units = [(f"part-i{key:05d}-{k:03d}.parquet", run) for k, run in enumerate(runs)]
    rows = []
    finished = set(done)
    for part, unit in units:
        if part in finished:
            continue
        unit_samples, keys = _with_images(unit)
        rows.append(_unit_row(part, unit_samples, _read_images(shards, images_file(key), keys) if keys else []))
    return pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)


def _read_images(shards: str, name: str, keys: list[str]) -> list[bytes]:
    """The bytes of `keys` from one images file, reading only their row groups (one image each)."""
    fs, path = storage.arrow_fs(storage.join(shards, name))
    table = pq.read_table(path, filesystem=fs, columns=["image_key", "bytes"],
                          filters=pc.field("image_key").isin(keys))
    found = dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(f"{len(missing)} image(s) missing from {name} in {shards}, e.g. {missing[0]}")
    return [found[k] for k in keys]


def official_units(file_rows: list[tuple[str, int]], rows_per_file: int, group_size: int) -> list[dict[str, Any]]:
    """Units of consecutive samples in mixture order over the samples files (name, rows), each a whole
    number of groups of group_size: {part, slices: [[file, first row, end row, first position]]}."""
    size = max(1, -(-rows_per_file // group_size)) * group_size
    total = sum(rows for _, rows in file_rows)
    units = []
    for number, start in enumerate(range(0, total, size)):
        end, slices, offset = min(start + size, total), [], 0
        for name, rows in file_rows:
            lo, hi = max(start, offset), min(end, offset + rows)
            if lo < hi:
                slices.append([name, lo - offset, hi - offset, lo])
            offset += rows
        units.append({"part": f"part-o{number:05d}.parquet", "slices": json.dumps(slices)})
    return units


_STORES: dict[str, ImageStore] = {}


def gather_official_batch(batch: dict[str, Any], shards: str, group_size: int) -> pa.Table:
    """Ray Data map_batches function over official units: each unit's samples read from their
    samples files, given their groups, and their images fetched by key."""
    if shards not in _STORES:  # one store per worker process: its open files and footers are reused
        _STORES.clear()
        _STORES[shards] = ImageStore(shards)
    store = _STORES[shards]
    rows = []
    for part, slices in zip(batch["part"], batch["slices"]):
        samples = []
        for name, lo, hi, first in json.loads(str(slices)):
            table = storage.read_parquet(storage.join(shards, name), columns=SAMPLE_COLUMNS).slice(lo, hi - lo)
            samples += [{**s, "group": (first + i) // group_size} for i, s in enumerate(table.to_pylist())]
        unit_samples, keys = _with_images(samples)
        rows.append(_unit_row(str(part), unit_samples, [store.get(k) for k in keys]))
    return pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)
