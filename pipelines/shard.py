"""Stage 1, shard: LLaVA's mixture JSON + image folders into Parquet shards, as streaming Ray Data work.

Output, under `shards/`:
  samples-NNNNN.parquet  one row per kept sample of the NNNNN-th run of ShardConfig.rows_per_shard
                         records, in mixture order: index, id, source, image_path, image_key, conversations
  images-NNNNN.parquet   one row per distinct image (by content hash): image_key, bytes, width, height;
                         the file is the key's hash bucket, rows sorted by key (pipelines.images)
  rejects.parquet        one row per record set aside: index, id, reason, detail
  manifest.json          counts per source and per reject reason, the input, the config

The driver never holds the mixture: one worker scans it for the byte ranges of runs of records
(pipelines.mixture), workers parse and check the runs, read and hash the distinct images, write the
images once each, then write the samples with their image keys. The driver keeps one entry per
distinct image path (for the keys) and per run (for the counts), never one per record.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from pipelines import storage
from pipelines.config import ShardConfig
from pipelines.images import IMAGE_LAYOUT, load_image
from pipelines.manifests import ShardsManifest
from pipelines.mixture import Chunk, iter_records, scan_chunks
from pipelines.shard_images import IMAGE_SCHEMA, ImageIndex, hash_image_batch, write_bucket_batch
from pipelines.shard_records import (
    REJECT_SCHEMA,
    SAMPLE_SCHEMA,
    WORK,
    Reject,
    check_record,
    infer_source,
    write_chunk_batch,
)

# The pure pieces, importable from the stage's module (tests, benchmarks/naive_shard.py).
__all__ = ["IMAGE_SCHEMA", "REJECT_SCHEMA", "SAMPLE_SCHEMA", "Reject", "check_record", "infer_source", "iter_records",
           "load_image", "run_shard"]

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: streamed, images in hash buckets


# Ray wrapper ----------------------------------------------------------------------------------


def _input_fingerprint(mixture: str, image_root: str, cfg: ShardConfig) -> dict:
    fs, path = storage.fsspec_fs(mixture)
    info = fs.info(path)
    return {"mixture": mixture, "size": info.get("size"), "etag_or_mtime": str(info.get("ETag") or info.get("mtime")),
            "image_root": image_root, "config": asdict(cfg), "version": MANIFEST_VERSION}


def run_shard(mixture: str, image_root: str, out: str, cfg: ShardConfig) -> ShardsManifest:
    """Shard the mixture; skip if `out` already holds a manifest of the same input and config."""
    import ray

    fingerprint = _input_fingerprint(mixture, image_root, cfg)
    previous = ShardsManifest.read_if_exists(out)
    if previous is not None and previous.input == fingerprint:
        logger.info("%s is already complete for this input; nothing to do", out)
        return previous
    started = time.time()
    storage.makedirs(out)
    for name in storage.listdir(out, ".parquet"):  # a previous, different run's files
        storage.remove(storage.join(out, name))
    # One worker reads the mixture once: the runs' byte ranges and the distinct image paths.
    chunks, paths = ray.get(ray.remote(num_cpus=1)(scan_chunks).remote(mixture, cfg.rows_per_shard))
    logger.info("%s: %d records in %d runs of up to %d, %d distinct image paths", mixture, sum(c.count for c in chunks),
                len(chunks), cfg.rows_per_shard, len(paths))
    index = _hash_images(paths, image_root, cfg)
    del paths
    counts = _write_samples(chunks, mixture, out, index, cfg)
    stored = _write_images(index, counts["keys"], image_root, out, cfg)
    rejects = [storage.read_parquet(storage.join(out, WORK, f"rejects-{c.number:05d}.parquet")) for c in chunks]
    table = pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table()
    storage.write_parquet(storage.join(out, "rejects.parquet"), table)
    if not chunks:  # an empty mixture still has a samples table
        storage.write_parquet(storage.join(out, "samples-00000.parquet"), SAMPLE_SCHEMA.empty_table())
    storage.remove(storage.join(out, WORK))
    manifest = ShardsManifest(
        input=fingerprint, samples=counts["kept"], rejects=table.num_rows, images=sum(stored["images"]),
        image_bytes=sum(stored["bytes"]), image_files=len(stored["bucket"]),
        per_source=dict(sorted(counts["source"].items())), per_reject_reason=dict(sorted(counts["reason"].items())),
        seconds=round(time.time() - started, 2),
        image_layout=IMAGE_LAYOUT, sample_files=max(len(chunks), 1))
    manifest.write(out)
    logger.info("%d samples, %d distinct images, %d rejects -> %s", manifest.samples, manifest.images,
                manifest.rejects, out)
    return manifest


def _hash_images(paths: list[str], image_root: str, cfg: ShardConfig) -> ImageIndex:
    """Every distinct path read, decoded and hashed by workers."""
    import ray

    index = ImageIndex()
    if not paths:
        return index
    blocks = -(-len(paths) // cfg.read_batch_size)
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks).map_batches(
        hash_image_batch, fn_kwargs={"image_root": image_root},  # type: ignore[arg-type]
        batch_size=cfg.read_batch_size, compute=ray.data.TaskPoolStrategy(size=cfg.concurrency), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for path, key, width, height, size, error, detail in zip(
                *(batch[k] for k in ("path", "image_key", "width", "height", "size", "error", "detail"))):
            index.add(str(path), str(key), int(width), int(height), int(size), str(error), str(detail))
    logger.info("%d image paths: %d distinct images, %d unreadable", len(paths), len(index.owner), len(index.error_of))
    return index


def _write_images(index: ImageIndex, used: set[str], image_root: str, out: str, cfg: ShardConfig) -> dict[str, list]:
    """The images the kept samples use, each stored once, in files written by workers."""
    import ray

    written: dict[str, list] = {"bucket": [], "images": [], "bytes": []}
    buckets = index.buckets(cfg.images_per_shard, used)
    dataset = ray.data.from_items(buckets, override_num_blocks=len(buckets)).map_batches(
        write_bucket_batch, fn_kwargs={"image_root": image_root, "out": out},  # type: ignore[arg-type]
        batch_size=1, compute=ray.data.TaskPoolStrategy(size=cfg.concurrency), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for key in written:
            written[key] += [int(v) for v in batch[key]]
    return written


def _write_samples(chunks: list[Chunk], mixture: str, out: str, index: ImageIndex, cfg: ShardConfig) -> dict[str, Any]:
    """Runs parsed, checked, given their image keys and written by workers; returns the counts and
    the image keys the kept samples use."""
    import ray

    totals: dict[str, Any] = {"kept": 0, "source": Counter(), "reason": Counter(), "keys": set()}
    if not chunks:
        return totals
    ref = ray.put((index.key_of, index.error_of))
    dataset = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks)).map_batches(
        write_chunk_batch, fn_kwargs={"mixture": mixture, "out": out, "index_ref": ref},  # type: ignore[arg-type]
        batch_size=1, compute=ray.data.TaskPoolStrategy(size=cfg.concurrency), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for kept, counts, keys in zip(batch["kept"], batch["counts"], batch["keys"]):
            totals["kept"] += int(kept)
            totals["keys"].update(str(k) for k in keys)
            for name, values in json.loads(counts).items():
                totals[name].update(values)
    return totals
