"""Stage 1, shard: LLaVA's mixture JSON + image folders into Parquet shards, as streaming Ray Data work.

Output, one version folder per identity under `shards/` (pipelines.manifests: versioned outputs):
  CURRENT.json               which version is complete and current, written last (readers go there)
  v-<12 hex>/identity.json   what the version is made from, written first: the mixture (size and a
                             SHA-256 of its bytes), the image root, the images (every referenced path's
                             content key and size, or its error), the knobs that change rows or files
  v-<12 hex>/samples-NNNNN.parquet  one row per kept sample of the NNNNN-th run of
                             ShardConfig.rows_per_shard records, in mixture order: index, id, source,
                             image_path, image_key, conversations
  v-<12 hex>/images-NNNNN.parquet   one row per distinct image (by content hash): image_key, bytes, width,
                             height; the file is the key's hash bucket, rows sorted by key (pipelines.image_store)
  v-<12 hex>/rejects.parquet one row per record set aside: index, id, reason, detail
  v-<12 hex>/image_index.parquet    every distinct image path: key or error, size, modification stamp
  v-<12 hex>/manifest.json   every file above with its rows, counts per source and per reject reason
A rerun with the same identity finds its version complete and does nothing more; a changed input
(mixture, images, knobs) writes a new version beside the old, which stays until ShardConfig.keep_versions
newer complete ones exist. Readers (precompute) read only the files the manifest lists.

The driver never holds the mixture: one worker scans it for the byte ranges of runs of records
(pipelines.shard.mixture) and hashes it, workers stat, read and hash the distinct images (an image whose
size and stamp match the current version's index is not read again), parse and check the runs, write
the images once each, then write the samples with their image keys. Where the image writers find an
image's bytes no longer hash to its key (it changed since it was indexed or read), those images are read
again and the version written anew under the identity their new content gives. The driver keeps one entry per
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
from pipelines.image_store import IMAGE_LAYOUT, images_file
from pipelines.images import load_image
from pipelines.manifests import ShardsManifest, publish, resolve_output, start_version, version_of
from pipelines.shard.image_index import (
    HASH_COLUMNS,
    IMAGE_SCHEMA,
    INDEX_FILE,
    ImageIndex,
    hash_image_batch,
    read_known,
    write_bucket_batch,
)
from pipelines.shard.mixture import Chunk, iter_records, scan_chunks
from pipelines.shard.records import (
    REJECT_SCHEMA,
    SAMPLE_SCHEMA,
    WORK,
    Reject,
    check_record,
    infer_source,
    samples_file,
    write_chunk_batch,
)

# The pure pieces, importable from the stage's module (tests, benchmarks/naive_shard.py).
__all__ = ["IMAGE_SCHEMA", "REJECT_SCHEMA", "SAMPLE_SCHEMA", "Reject", "check_record", "infer_source", "iter_records",
           "load_image", "run_shard"]

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 4
"""In the identity: 3, versioned folders whose manifests list their files; 4, the records LLaVA trains
on kept (a first turn from gpt dropped, empty turns), so a rerun shards anew."""
NON_OUTPUT_KNOBS = frozenset({"read_batch_size", "concurrency", "keep_versions"})
"""ShardConfig fields that change neither rows nor files: left out of the identity (every other is in)."""


# Ray wrapper ----------------------------------------------------------------------------------


def base_identity(mixture: str, mixture_sha256: str, image_root: str, cfg: ShardConfig) -> dict[str, Any]:
    """The identity before the images are known: the mixture's size and content, the image root, the
    knobs that change what is written."""
    size, _ = storage.stat(mixture)
    knobs = {k: v for k, v in asdict(cfg).items() if k not in NON_OUTPUT_KNOBS}
    return {"mixture": {"uri": mixture, "size": size, "sha256": mixture_sha256}, "image_root": image_root,
            "config": knobs, "version": MANIFEST_VERSION}


def _scan(mixture: str, rows: int) -> tuple[str, list[Chunk], list[str]]:
    """In a worker: the mixture's SHA-256 (streamed), its runs and its distinct image paths. The scan
    goes first: it refuses a file that cannot be a mixture with a MixtureError naming it, a named pipe
    or a directory before anything opens it (reading a pipe would block)."""
    chunks, paths = scan_chunks(mixture, rows)
    return storage.sha256(mixture), chunks, paths


def run_shard(mixture: str, image_root: str, out: str, cfg: ShardConfig) -> ShardsManifest:
    """Shard the mixture into the version of `out` its identity names; a complete version of the same
    identity is made current without writing anything. Older complete versions beyond
    cfg.keep_versions are removed once the new one is current."""
    import ray

    started = time.time()
    digest, chunks, paths = ray.get(ray.remote(num_cpus=1)(_scan).remote(mixture, cfg.rows_per_shard))
    logger.info("%s: %d records in %d runs of up to %d, %d distinct image paths", mixture, sum(c.count for c in chunks),
                len(chunks), cfg.rows_per_shard, len(paths))
    known = _known_images(out, image_root)
    for attempt in (1, 2):
        identity = base_identity(mixture, digest, image_root, cfg)
        index = _hash_images(paths, image_root, cfg, known)
        identity["images"] = {"distinct_paths": len(index.key_of) + len(index.error_of), "sha256": index.digest()}
        version = version_of(identity)
        previous = ShardsManifest.read_if_exists(storage.join(out, version))
        if previous is not None:
            logger.info("%s/%s is already complete for this input; nothing to write", out, version)
            publish(out, version, cfg.keep_versions)
            return previous
        manifest, changed = _write_version(start_version(out, identity), identity, chunks, mixture, image_root, index,
                                           cfg)
        if not changed:
            break
        if attempt == 2:
            raise RuntimeError(f"{len(changed)} image(s) changed while shard was running, e.g. "
                               f"{storage.join(image_root, changed[0])}; run shard again once they stay put")
        logger.warning("%d image(s) changed since they were indexed (e.g. %s): reading them again", len(changed),
                       changed[0])
        known = {path: entry for path, entry in known.items() if path not in set(changed)}
    assert manifest is not None  # the loop leaves with a manifest or raises
    manifest.seconds = round(time.time() - started, 2)
    manifest.write(storage.join(out, version))  # last: the version is complete
    publish(out, version, cfg.keep_versions)
    logger.info("%d samples, %d distinct images, %d rejects -> %s/%s (now current)", manifest.samples,
                manifest.images, manifest.rejects, out, version)
    return manifest


def _write_version(folder: str, identity: dict[str, Any], chunks: list[Chunk], mixture: str, image_root: str,
                   index: ImageIndex, cfg: ShardConfig) -> tuple[ShardsManifest | None, list[str]]:
    """Every file of a version written into its folder (names fixed by the identity, so a stopped
    attempt's files are overwritten, never mixed in); returns its manifest, not yet written, or None
    with the image paths whose bytes changed since the first pass (the version is then left unfinished)."""
    counts = _write_samples(chunks, mixture, folder, index, cfg)
    stored = _write_images(index, counts["keys"], image_root, folder, cfg)
    if stored["changed"]:
        return None, sorted(stored["changed"])
    rejects = [storage.read_parquet(storage.join(folder, WORK, f"rejects-{c.number:05d}.parquet")) for c in chunks]
    table = pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table()
    storage.write_parquet(storage.join(folder, "rejects.parquet"), table)
    if not chunks:  # an empty mixture still has a samples table
        storage.write_parquet(storage.join(folder, samples_file(0)), SAMPLE_SCHEMA.empty_table())
        counts["files"][samples_file(0)] = 0
    image_table = index.table()
    storage.write_parquet(storage.join(folder, INDEX_FILE), image_table)
    storage.remove(storage.join(folder, WORK))
    files = counts["files"] | {images_file(b): n for b, n in zip(stored["bucket"], stored["images"])} | {
        "rejects.parquet": table.num_rows, INDEX_FILE: image_table.num_rows}
    return ShardsManifest(
        input=identity, samples=counts["kept"], rejects=table.num_rows, images=sum(stored["images"]),
        image_bytes=sum(stored["bytes"]), image_files=len(stored["bucket"]),
        per_source=dict(sorted(counts["source"].items())), per_reject_reason=dict(sorted(counts["reason"].items())),
        image_layout=IMAGE_LAYOUT, sample_files=max(len(chunks), 1), version=version_of(identity),
        files=dict(sorted(files.items()))), []


def _known_images(out: str, image_root: str) -> dict[str, tuple]:
    """The current version's image index where it has the same image root (its paths mean the same
    files): path -> (size, stamp, key, width, height); {} otherwise."""
    try:
        folder = resolve_output(out)
        manifest = ShardsManifest.read(folder)
    except FileNotFoundError:
        return {}
    if manifest.input.get("image_root") != image_root or INDEX_FILE not in manifest.files:
        return {}
    known = read_known(folder)
    logger.info("%d image(s) known from %s: read again only where their size or stamp changed", len(known), folder)
    return known


def _hash_images(paths: list[str], image_root: str, cfg: ShardConfig, known: dict[str, tuple]) -> ImageIndex:
    """Every distinct path stat'ed, and read, decoded and hashed where `known` does not hold it
    unchanged, by workers."""
    import ray

    index = ImageIndex()
    if not paths:
        return index
    known_ref = ray.put(known) if known else None
    blocks = -(-len(paths) // cfg.read_batch_size)
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks).map_batches(
        hash_image_batch, fn_kwargs={"image_root": image_root, "known": known_ref, "cfg": cfg},  # type: ignore[arg-type]
        batch_size=cfg.read_batch_size, compute=_tasks(cfg, blocks), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for path, key, width, height, size, stamp, error, detail in zip(*(batch[k] for k in HASH_COLUMNS)):
            index.add(str(path), str(key), int(width), int(height), int(size), str(error), str(detail), str(stamp))
    logger.info("%d image paths: %d distinct images, %d unreadable", len(paths), len(index.owner), len(index.error_of))
    return index


def _tasks(cfg: ShardConfig, blocks: int) -> Any:
    """At most cfg.concurrency tasks, and no more than there are blocks of work (Ray Data warns of idle slots)."""
    import ray

    return ray.data.TaskPoolStrategy(size=max(1, min(cfg.concurrency, blocks)))


def _write_images(index: ImageIndex, used: set[str], image_root: str, out: str, cfg: ShardConfig) -> dict[str, list]:
    """The images the kept samples use, each stored once, in files written by workers."""
    import ray

    written: dict[str, list] = {"bucket": [], "images": [], "bytes": [], "changed": []}
    buckets = index.buckets(cfg.images_per_shard, used)
    dataset = ray.data.from_items(buckets, override_num_blocks=len(buckets)).map_batches(
        write_bucket_batch, fn_kwargs={"image_root": image_root, "out": out},  # type: ignore[arg-type]
        batch_size=1, compute=_tasks(cfg, len(buckets)), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for key in ("bucket", "images", "bytes"):
            written[key] += [int(v) for v in batch[key]]
        written["changed"] += [path for paths in batch["changed"] for path in json.loads(str(paths))]
    return written


def _write_samples(chunks: list[Chunk], mixture: str, out: str, index: ImageIndex, cfg: ShardConfig) -> dict[str, Any]:
    """Runs parsed, checked, given their image keys and written by workers; returns the counts and
    the image keys the kept samples use."""
    import ray

    totals: dict[str, Any] = {"kept": 0, "source": Counter(), "reason": Counter(), "keys": set(), "files": {}}
    if not chunks:
        return totals
    ref = ray.put((index.key_of, index.error_of))
    dataset = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks)).map_batches(
        write_chunk_batch, fn_kwargs={"mixture": mixture, "out": out, "index_ref": ref},  # type: ignore[arg-type]
        batch_size=1, compute=_tasks(cfg, len(chunks)), batch_format="default")
    for batch in dataset.iter_batches(batch_size=None, batch_format="default"):
        for number, kept, counts, keys in zip(batch["chunk"], batch["kept"], batch["counts"], batch["keys"]):
            totals["files"][samples_file(int(number))] = int(kept)
            totals["kept"] += int(kept)
            totals["keys"].update(str(k) for k in keys)
            for name, values in json.loads(counts).items():
                totals[name].update(values)
    return totals
