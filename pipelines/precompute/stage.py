"""Stage 2, precompute: the frozen CLIP towers run once, offline; TRIM's reduced tokens are cached.

Input: the shards' current version (or a version folder given directly), only the files its manifest
lists, each checked for its rows. Output, one version folder per identity under `cache/`
(pipelines.manifests: versioned outputs):
  CURRENT.json               which version is complete and current, written last (training reads it)
  v-<12 hex>/identity.json   what the cache is made from (the encoder with a digest of its weight
                             files, layer, dtype, TRIM config, the shards' version, unit layout), first
  v-<12 hex>/part-*.parquet  one row per sample (pipelines.cache_format.CACHE_SCHEMA), one file per unit
                             of work under a deterministic name (pipelines.precompute.units); a part is
                             written whole by the worker that computed it, so a stopped job resumes by
                             skipping the parts that exist in its version
  v-<12 hex>/manifest.json   every part with its rows, counts and kept-token statistics, written last
A run with another identity (new shards, new weights, another setting) writes a new version, never
mixing with or refusing an older one; older complete versions beyond PrecomputeConfig.keep_versions
are removed once the new one is current.

One streaming Ray Data pipeline, the shape of Ray's batch-inference guide: the shards' samples read
and grouped into units (each distinct image once; `official`: groups in mixture order) -> CPU tasks
that gather each unit's image bytes, decode, pad, resize and tokenize (as many as there are CPUs) ->
encoder actors (GPU, or CPU) that run the vision tower to the selected layer, the text tower over the
unit's texts and TRIM on the device, and write the part -> small summaries to the driver. No image or
cache bytes pass through the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines import storage
from pipelines.cache_format import CACHE_SCHEMA, committed_parts, part_table, read_parts, write_part
from pipelines.config import PrecomputeConfig, Recipe, ShardConfig
from pipelines.manifests import (
    CacheManifest,
    KeptStats,
    ShardsManifest,
    publish,
    start_version,
    version_of,
)
from pipelines.precompute.encode import batch_grouped, encode_unit
from pipelines.precompute.prepare import decode_unit, prepare_batch
from pipelines.precompute.units import (
    TEXT_SPAN,
    gather_group,
    gather_official_batch,
    official_units,
    read_samples_batch,
    read_shards,
    sample_files,
)
from trim import TrimConfig
from trim.conversation import trim_text

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 2
"""Version of the unit layout (part names and contents): part of the cache's identity."""


class EncoderActor:
    """Ray Data actor: loads the CLIP towers once; each call encodes prepared units and writes their
    parts, returning one small summary row per part. On a GPU two calls run at once: the device work
    is taken in turn (one stream: measured on an H200, two threads on two streams ran 0.88 of one
    thread's rate), while one call builds and writes its part on the host, the other's unit runs."""

    def __init__(self, clip_path: str, cache: str, layer: int, trim_cfg: dict, batch_size: int, dtype: str,
                 threads: int = 1):
        from trim.encoders import ClipEncoder

        torch.set_num_threads(threads)  # Ray gives an actor one thread unless told otherwise
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = ClipEncoder(clip_path, layer=layer, device=device, dtype=getattr(torch, dtype))
        self.cache, self.cfg, self.batch_size = cache, TrimConfig.from_dict(trim_cfg), batch_size
        self._device = threading.Lock()

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        out: dict[str, list] = {"part": [], "samples": [], "visual": [], "kept": [], "bytes": []}
        for i in range(batch.num_rows):
            row = {name: _value(batch.column(name)[i]) for name in batch.column_names}
            samples, unit = decode_unit(row, self.cfg.seed)
            with self._device:
                reduced = encode_unit(self.encoder.towers, unit, self.cfg, self.batch_size)
            size = write_part(self.cache, row["part"], part_table(samples, reduced, self.encoder.feature_dim))
            out["part"].append(row["part"])
            out["samples"].append(len(samples))
            out["visual"].append(int(reduced.has_image.sum()))
            out["kept"].append(int(reduced.num_kept[reduced.has_image].sum()))
            out["bytes"].append(size)
        return out


def _value(scalar: Any) -> Any:
    """A column value of one row; binary values as Arrow buffers (no copy of pixel arrays)."""
    return scalar.as_buffer() if pa.types.is_binary(scalar.type) else scalar.as_py()


# Driver -----------------------------------------------------------------------------------------


NON_OUTPUT_KNOBS = frozenset({"batch_size", "concurrency", "num_gpus_per_actor", "num_cpus_per_actor",
                              "encoder_threads", "keep_versions"})
"""PrecomputeConfig fields that do not change the cache: left out of its identity (every other is in)."""


def cache_identity(encoder_info: dict, trim_cfg: TrimConfig, shards_manifest: ShardsManifest,
                   cfg: PrecomputeConfig) -> dict:
    """Everything that changes the cache: the encoder (its config_hash covers the weight files), the
    knobs (layer, dtype, rows_per_file: the unit layout), the TRIM config and the shards' version."""
    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_OUTPUT_KNOBS}
    return {"encoder": encoder_info, "precompute": knobs, "trim": trim_cfg.to_dict(),
            "shards": {"version": shards_manifest.version, "samples": shards_manifest.samples},
            "layout": {"version": LAYOUT_VERSION}}


def load_samples(shards: str, trim_cfg: TrimConfig) -> list[dict]:
    """Every sample of the shards with its TRIM text, in memory (small uses: pictures, benchmarks)."""
    folder, manifest = read_shards(shards)
    rows = [row for name, _ in sample_files(manifest) for row in storage.read_parquet(storage.join(folder, name))
            .to_pylist()]
    for row in rows:
        row["text"] = trim_text(json.loads(row["conversations"]), trim_cfg.text)
    return rows


def run_precompute(shards: str, cache: str, clip_path: str, trim_cfg: TrimConfig,
                   cfg: PrecomputeConfig) -> CacheManifest:
    """Write the TRIM cache of the current shards into the version of `cache` its identity names;
    resume there where a stopped run left off; a complete one is made current without work."""
    from trim.encoders import describe_checkpoint

    started = time.time()
    shards_dir, shards_manifest = read_shards(shards)
    info = describe_checkpoint(clip_path, layer=cfg.layer)  # config + weight digest: the weights load in the actors
    identity = cache_identity(info, trim_cfg, shards_manifest, cfg)
    version = version_of(identity)
    finished = CacheManifest.read_if_exists(storage.join(cache, version))
    if finished is not None:
        logger.info("%s/%s is complete for these shards and settings; nothing to do", cache, version)
        publish(cache, version, cfg.keep_versions)
        return finished
    folder = start_version(cache, identity)
    for name in storage.listdir(folder):
        if ".parquet.tmp-" in name:  # a part a killed run was writing
            storage.remove(storage.join(folder, name))
    done = committed_parts(folder)
    logger.info("%d samples of %s -> %s; parts: %d already written, the rest is computed now",
                shards_manifest.samples, shards_dir, folder, len(done))
    units = _units(shards_dir, shards_manifest, trim_cfg, cfg, done)
    image_bytes = int(shards_manifest.input.get("config", {}).get("max_image_bytes") or ShardConfig().max_image_bytes)
    _encode(units, folder, clip_path, trim_cfg, cfg, info, image_bytes)
    manifest = summarize(folder, identity_info=info, trim_cfg=trim_cfg, seconds=time.time() - started)
    if manifest.samples != shards_manifest.samples:
        raise RuntimeError(f"precompute: {folder} holds {manifest.samples} samples, the shards "
                           f"{shards_manifest.samples} ({shards_dir})")
    manifest.identity, manifest.version = identity, version
    manifest.write(folder)  # last: the version is complete
    publish(cache, version, cfg.keep_versions)
    logger.info("%d samples cached in %s (now current); kept share %.3f, %.0f B/sample", manifest.samples, folder,
                manifest.kept.mean_share, manifest.bytes_per_visual_sample)
    return manifest


def _units(shards: str, manifest: ShardsManifest, trim_cfg: TrimConfig, cfg: PrecomputeConfig, done: list[str]) -> Any:
    """The units not yet written, with their image bytes, as a Ray Data dataset (see precompute_units).
    `shards` is the version folder; only the samples files its manifest lists are read."""
    import ray

    file_rows = sample_files(manifest)
    if batch_grouped(trim_cfg):
        pending = [u for u in official_units(file_rows, cfg.rows_per_file, trim_cfg.batch_group_size)
                   if u["part"] not in set(done)]
        if not pending:
            return None
        return ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            gather_official_batch, fn_kwargs={"shards": shards, "group_size": trim_cfg.batch_group_size},  # type: ignore[arg-type]
            batch_size=1, batch_format="numpy")
    # Only sample rows (no image bytes) are shuffled: a pull-based sort shuffle, light on a small cluster.
    names = [name for name, _ in file_rows]
    keyed = ray.data.from_items([{"name": n} for n in names], override_num_blocks=len(names)).map_batches(
        read_samples_batch, batch_size=1, batch_format="pyarrow",  # type: ignore[arg-type]
        fn_kwargs={"shards": shards, "files": manifest.image_files, "rows_per_file": cfg.rows_per_file})
    keyed.context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    text_units = manifest.samples // (cfg.rows_per_file * TEXT_SPAN) + 1
    partitions = min(manifest.image_files + text_units, 200)
    return keyed.groupby("unit", num_partitions=partitions).map_groups(
        gather_group, fn_kwargs={"shards": shards, "files": manifest.image_files,  # type: ignore[arg-type]
                                 "rows_per_file": cfg.rows_per_file,
                                 "done": done}, batch_format="pyarrow")


def _encode(units: Any, cache: str, clip_path: str, trim_cfg: TrimConfig, cfg: PrecomputeConfig, info: dict,
            image_bytes: int) -> None:
    """Prepare (CPU tasks) and encode (actors) the units; log each part as its summary comes back.
    image_bytes: the shards' per-image memory budget (one decoded image per task at a time)."""
    import ray

    if units is None:
        return
    gpu = cfg.num_gpus_per_actor > 0
    # The memory a task needs (a unit's bytes and pixels, one decoded image): also what keeps Ray Data
    # from fusing these CPU tasks into the encoder actors when both ask for one CPU and no GPU.
    side = int(info["image_size"])
    memory = 512 * 2**20 + cfg.rows_per_file * 4 * side * side + image_bytes
    prepared = units.map_batches(prepare_batch, batch_size=1, batch_format="pyarrow", memory=memory,
                                 fn_kwargs={"clip_path": clip_path, "text_mode": trim_cfg.text,  # type: ignore[arg-type]
                                            "grouped": batch_grouped(trim_cfg)})
    compute = ray.data.ActorPoolStrategy(size=cfg.concurrency, max_concurrent_calls_per_actor=2 if gpu else 1,
                                         enable_true_multi_threading=gpu)
    summaries = prepared.map_batches(
        EncoderActor, batch_size=1, batch_format="pyarrow", compute=compute,
        num_gpus=cfg.num_gpus_per_actor, num_cpus=_actor_cpus(cfg),
        fn_constructor_kwargs=dict(clip_path=clip_path, cache=cache, layer=cfg.layer, trim_cfg=trim_cfg.to_dict(),
                                   batch_size=cfg.batch_size, dtype=cfg.dtype,
                                   threads=cfg.encoder_threads or cfg.num_cpus_per_actor))
    for n, row in enumerate(summaries.iter_rows(), 1):
        visual = max(int(row["visual"]), 1)
        logger.info("part %d written: %s, %d samples (%d with an image), mean kept %.1f/%d patches, %.1f MB", n,
                    row["part"], row["samples"], row["visual"], row["kept"] / visual, info["num_patches"],
                    row["bytes"] / 1e6)


def _actor_cpus(cfg: PrecomputeConfig) -> float:
    """The CPUs each encoder actor asks Ray for: num_cpus_per_actor, less where the actors would take
    every CPU of the cluster and leave none to the tasks that feed them (which would wait forever).
    Its torch threads stay as configured."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    wanted = float(cfg.num_cpus_per_actor)
    if wanted * cfg.concurrency <= total - 1:
        return wanted
    capped = max((total - 1) / cfg.concurrency, 0.25)
    logger.info("%d encoder actor(s) x %g CPUs would leave none of the cluster's %g to the decode tasks: each asks "
                "for %g (torch threads unchanged)", cfg.concurrency, wanted, total, capped)
    return capped


def summarize(cache: str, identity_info: dict, trim_cfg: TrimConfig, seconds: float) -> CacheManifest:
    """Counts, kept-token statistics and the parts with their rows (the manifest's body) of a version
    folder whose parts are all written, from a few columns read as Arrow arrays. Each sample (its
    position in the mixture) must be there exactly once."""
    tables = read_parts(cache, committed_parts(cache), ["index", "source", "num_tokens", "num_kept"])
    table = pa.concat_tables(tables.values()) if tables else CACHE_SCHEMA.empty_table().select(
        ["index", "source", "num_tokens", "num_kept"])
    positions = table.column("index").to_numpy()
    if len(np.unique(positions)) != len(positions):
        raise RuntimeError(f"precompute: {cache} holds a sample more than once")
    tokens = table.column("num_tokens").to_numpy()
    visual = tokens > 0
    kept = table.column("num_kept").to_numpy()[visual] if visual.any() else np.zeros(1)
    num_patches = identity_info["num_patches"]
    size = sum(storage.size(storage.join(cache, n)) for n in tables)
    counts = pc.value_counts(table.column("source")).to_pylist()
    return CacheManifest(
        encoder=identity_info, trim=trim_cfg.to_dict(), samples=len(positions), visual_samples=int(visual.sum()),
        text_only_samples=int((~visual).sum()), per_source=dict(sorted((c["values"], c["counts"]) for c in counts)),
        kept=KeptStats(mean=float(kept.mean()), median=float(np.median(kept)), min=int(kept.min()),
                       max=int(kept.max()), mean_share=float(kept.mean() / num_patches),
                       mean_tokens=float(tokens[visual].mean()) if visual.any() else 0.0),
        cache_bytes=int(size), bytes_per_visual_sample=size / max(int(visual.sum()), 1),
        full_feature_bytes_per_image=num_patches * identity_info["feature_dim"] * 2, seconds=round(seconds, 2),
        files={name: t.num_rows for name, t in tables.items()})


def log_precompute(recipe: Recipe, manifest: CacheManifest) -> CacheManifest:
    """Log a finished precompute to MLflow (run `<train.run_name>-precompute` in the recipe's
    experiment): kept-token statistics, the manifest and recipe.eval.num_pictures pictures of cached
    samples. Returns the manifest, so a job can `return log_precompute(...)`."""
    from pipelines.pictures import cache_pictures, log_pictures
    from pipelines.tracking import Tracker
    from pipelines.tracking_store import default_tracking_uri, experiment_name

    paths = recipe.paths
    with Tracker(default_tracking_uri(paths.root), experiment_name(recipe.name)) as tracker:
        tracker.start(f"{recipe.train.run_name}-precompute")
        tracker.log_params({"trim": recipe.trim.to_dict(), "precompute": dataclasses.asdict(recipe.precompute),
                            "paths": {"shards": paths.shards, "cache": paths.cache, "clip": paths.clip},
                            "cache_version": manifest.version})
        kept = dataclasses.asdict(manifest.kept)
        tracker.log_metrics({f"kept_{k}": float(v) for k, v in kept.items()} | {
            "samples": float(manifest.samples), "visual_samples": float(manifest.visual_samples),
            "bytes_per_visual_sample": float(manifest.bytes_per_visual_sample)}, step=0)
        tracker.log_dict(manifest.to_dict(), "manifest.json")
        with tempfile.TemporaryDirectory() as directory:
            try:
                shards = storage.join(paths.shards, manifest.identity["shards"]["version"])  # the cache's own
                pictures = cache_pictures(shards, storage.join(paths.cache, manifest.version), directory,
                                          count=recipe.eval.num_pictures)
            except Exception as err:  # pictures are a courtesy: never fail the stage for them
                logger.warning("no pictures (%s: %s)", type(err).__name__, err)
                pictures = []
            log_pictures(tracker, pictures)
        if tracker.run_id:
            logger.info("logged %d pictures to MLflow run %s", len(pictures), tracker.run_id)
    return manifest
