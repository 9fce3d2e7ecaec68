"""Stage 2, precompute: the frozen CLIP towers run once, offline; TRIM's reduced tokens are cached.

Output, under `cache/`:
  config.json           what the cache is made with (encoder, layer, preprocessing, TRIM config, input);
                        written first, so a later run with another configuration is refused
  part-NNNNN.parquet    one row per sample (see CACHE_SCHEMA); a part is written whole, so a stopped
                        job resumes by skipping the parts that exist
  manifest.json         counts and kept-token statistics, written last

Work is planned deterministically from the shards: with a per-sample IQR each work item is one
distinct image with all the samples that share it (each image encoded once); with the batch-wide IQR
of `official`, an item is a "micro-batch": `batch_group_size` consecutive image samples in mixture order
(an image shared across two groups is encoded in each). A Ray Data actor pool loads the encoder once
per actor and turns items into cache rows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipelines import storage
from pipelines.cache_format import CACHE_SCHEMA, iter_cache, to_bytes
from pipelines.config import PrecomputeConfig, Recipe
from pipelines.images import ImageStore
from pipelines.manifests import CacheManifest, KeptStats, ShardsManifest
from trim import TrimConfig, trim_tokens
from trim.conversation import trim_text

logger = logging.getLogger(__name__)

# Planning (pure) ------------------------------------------------------------------------------


@dataclass
class WorkItem:
    """Samples processed together: the samples of one image, or one offline micro-batch."""

    part: int
    samples: list[dict] = field(default_factory=list)


def plan(samples: list[dict], image_order: list[str], trim_cfg: TrimConfig, rows_per_file: int) -> list[WorkItem]:
    """Deterministic work items, assigned to cache parts of about rows_per_file samples.

    samples: rows of the shards (id, index, source, image_key, conversations) with "text" added.
    image_order: image keys in the order of the image shards (for read locality)."""
    with_image = [s for s in samples if s["image_key"]]
    # A sample is its position in the mixture ("index"): ids repeat in the real 665K file.
    text_only = sorted((s for s in samples if not s["image_key"]), key=lambda s: s["index"])
    groups: list[list[dict]]
    if trim_cfg.iqr_scope == "batch" and trim_cfg.threshold == "iqr":
        ordered = sorted(with_image, key=lambda s: s["index"])
        size = trim_cfg.batch_group_size
        groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    else:
        rank = {key: i for i, key in enumerate(image_order)}
        by_image: dict[str, list[dict]] = {}
        for s in sorted(with_image, key=lambda s: (rank.get(s["image_key"], len(rank)), s["index"])):
            by_image.setdefault(s["image_key"], []).append(s)
        groups = list(by_image.values())
    groups += [text_only[i:i + 64] for i in range(0, len(text_only), 64)]
    items, part, in_part = [], 0, 0
    for group in groups:
        if in_part >= rows_per_file:
            part, in_part = part + 1, 0
        items.append(WorkItem(part=part, samples=group))
        in_part += len(group)
    return items


# The encoder actor's work (pure given an encoder) ----------------------------------------------


def reduce_items(encoder, images: ImageStore, items: list[dict], trim_cfg: TrimConfig, batch_size: int) -> list[dict]:
    """Cache rows for a list of work items (dicts with "samples"): each distinct image of the list
    encoded once, texts encoded in one batch, TRIM per item (the item is the IQR's batch)."""
    keys = sorted({s["image_key"] for item in items for s in item["samples"] if s["image_key"]})
    position = {key: i for i, key in enumerate(keys)}
    features, patch_embeds = [], []
    for i in range(0, len(keys), batch_size):
        pil = [Image.open(io.BytesIO(images.get(k))) for k in keys[i:i + batch_size]]
        out = encoder.encode_images(pil)
        features.append(out.features)
        patch_embeds.append(out.patch_embeds)
    all_features = torch.cat(features) if keys else None
    all_embeds = torch.cat(patch_embeds) if keys else None
    rows = []
    for item in items:
        samples = item["samples"]
        visual = [s for s in samples if s["image_key"]]
        rows += [_text_only_row(s, encoder.feature_dim) for s in samples if not s["image_key"]]
        if not visual:
            continue
        assert all_features is not None and all_embeds is not None  # visual samples have images
        index = torch.tensor([position[s["image_key"]] for s in visual])
        text_embeds = encoder.encode_texts([s["text"] for s in visual])
        result = trim_tokens(all_features[index], all_embeds[index], text_embeds, trim_cfg,
                             seeds=[trim_cfg.seed + int(s["index"]) for s in visual])
        for j, s in enumerate(visual):
            tokens = result.tokens[j]
            rows.append({
                **_base(s), "num_tokens": tokens.shape[0], "num_kept": int(result.num_kept[j]),
                "has_aggregate": bool(result.has_aggregate[j]), "token_dim": tokens.shape[1],
                "tokens": to_bytes(tokens),
                "kept_indices": torch.nonzero(result.keep_mask[j]).flatten().tolist(),
                "scores": to_bytes(result.scores[j]),
            })
    return rows


def _base(sample: dict) -> dict:
    return {k: sample[k] for k in ("id", "source", "index", "image_key", "conversations")}


def _text_only_row(sample: dict, dim: int) -> dict:
    return {**_base(sample), "num_tokens": 0, "num_kept": 0, "has_aggregate": False, "token_dim": dim,
            "tokens": b"", "kept_indices": [], "scores": b""}


class TrimActor:
    """Ray Data actor: loads the CLIP towers once, turns batches of work items into cache rows."""

    def __init__(self, clip_path: str, shards: str, layer: int, trim_cfg: dict, batch_size: int, dtype: str,
                 threads: int = 1):
        from trim.encoders import ClipEncoder

        torch.set_num_threads(threads)  # Ray gives an actor one thread unless told otherwise
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = ClipEncoder(clip_path, layer=layer, device=device, dtype=getattr(torch, dtype))
        self.images = ImageStore(shards)
        self.trim_cfg = TrimConfig.from_dict(trim_cfg)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        items = [{"samples": json.loads(s)} for s in batch["samples"]]
        rows = reduce_items(self.encoder, self.images, items, self.trim_cfg, self.batch_size)
        return {name: [r[name] for r in rows] for name in CACHE_SCHEMA.names}


# Ray wrapper ----------------------------------------------------------------------------------


def cache_identity(encoder_info: dict, trim_cfg: TrimConfig, shards_manifest: ShardsManifest, layer: int) -> dict:
    """What must match for two runs to write into the same cache."""
    return {"encoder": encoder_info, "layer": layer, "trim": trim_cfg.to_dict(),
            "shards": {"input": shards_manifest.input, "samples": shards_manifest.samples}}


def _check_identity(cache: str, identity: dict) -> None:
    uri = storage.join(cache, "config.json")
    if not storage.exists(uri):
        storage.write_json(uri, identity)
        return
    existing = storage.read_json(uri)
    if existing != identity:
        differs = sorted(k for k in identity if existing.get(k) != identity[k])
        raise ValueError(
            f"cache {cache} was written with a different configuration (differs in: {', '.join(differs)}); "
            f"refusing to add to it. Use another paths.root or remove {cache}.")


def load_samples(shards: str, trim_cfg: TrimConfig) -> list[dict]:
    rows = []
    for name in storage.listdir(shards, ".parquet"):
        if name.startswith("samples-"):
            rows += storage.read_parquet(storage.join(shards, name)).to_pylist()
    for row in rows:
        row["text"] = trim_text(json.loads(row["conversations"]), trim_cfg.text)
    return rows


def run_precompute(shards: str, cache: str, clip_path: str, trim_cfg: TrimConfig,
                   cfg: PrecomputeConfig) -> CacheManifest:
    """Write the TRIM cache; resume where a stopped run left off; refuse a foreign cache."""
    from trim.encoders import describe_checkpoint

    started = time.time()
    shards_manifest = ShardsManifest.read(shards)
    info = describe_checkpoint(clip_path, layer=cfg.layer)  # config only: the weights load in the actors
    _check_identity(cache, cache_identity(info, trim_cfg, shards_manifest, cfg.layer))
    finished = CacheManifest.read_if_exists(cache)
    if finished is not None:
        logger.info("%s is complete; nothing to do", cache)
        return finished

    samples = load_samples(shards, trim_cfg)
    items = plan(samples, ImageStore(shards).order, trim_cfg, cfg.rows_per_file)
    parts = sorted({item.part for item in items})
    done = {int(n[5:10]) for n in storage.listdir(cache, ".parquet") if n.startswith("part-")}
    pending = [item for item in items if item.part not in done]
    logger.info("%d samples in %d work items, %d parts; %d already written, %d to go", len(samples), len(items),
                len(parts), len(done), len(parts) - len(done))
    if pending:
        _write_parts(pending, items, cache, clip_path, shards, trim_cfg, cfg, info)
    manifest = summarize(cache, identity_info=info, trim_cfg=trim_cfg, seconds=time.time() - started)
    if manifest.samples != len(samples):
        raise RuntimeError(f"precompute: cache holds {manifest.samples} samples, shards {len(samples)}")
    manifest.write(cache)
    logger.info("%d samples cached in %s; kept share %.3f, %.0f B/sample", manifest.samples, cache,
                manifest.kept.mean_share, manifest.bytes_per_visual_sample)
    return manifest


def _write_parts(pending: list[WorkItem], items: list[WorkItem], cache: str, clip_path: str, shards: str,
                 trim_cfg: TrimConfig, cfg: PrecomputeConfig, info: dict) -> None:
    """Run the pending work items through the encoder actors; write each part once it is whole.
    Rows are matched to parts by the sample's position in the mixture (ids may repeat)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in plan order: parts complete in turn
    per_call = 1 if trim_cfg.iqr_scope == "batch" else cfg.batch_size
    dataset = ray.data.from_items(
        [{"part": i.part, "samples": json.dumps(i.samples)} for i in pending]
    ).map_batches(
        TrimActor, batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.num_cpus_per_actor,
        fn_constructor_kwargs=dict(clip_path=clip_path, shards=shards, layer=cfg.layer,
                                   trim_cfg=trim_cfg.to_dict(), batch_size=cfg.batch_size, dtype=cfg.dtype,
                                   threads=cfg.num_cpus_per_actor),
        batch_format="default")
    expected = {p: sum(len(i.samples) for i in items if i.part == p) for p in {i.part for i in items}}
    total = len(expected)
    written = total - len({i.part for i in pending})
    part_of = {s["index"]: item.part for item in pending for s in item.samples}
    buffers: dict[int, list[dict]] = {}
    for row in dataset.iter_rows():  # row by row: a part is written as soon as it is whole
        part = part_of[row["index"]]
        buffers.setdefault(part, []).append(row)
        if len(buffers[part]) == expected[part]:
            rows = sorted(buffers.pop(part), key=lambda r: r["index"])
            storage.write_parquet(storage.join(cache, f"part-{part:05d}.parquet"),
                                  pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))
            written += 1
            kept = [r["num_kept"] for r in rows if r["num_tokens"]]
            logger.info("part %d/%d written (%d samples, mean kept %.1f/%d patches)", written, total, len(rows),
                        np.mean(kept) if kept else 0, info["num_patches"])


def summarize(cache: str, identity_info: dict, trim_cfg: TrimConfig, seconds: float) -> CacheManifest:
    """Counts and kept-token statistics of a finished cache (the manifest's body). Each sample (its
    position in the mixture) must be there exactly once."""
    rows = list(iter_cache(cache, ["index", "source", "num_tokens", "num_kept", "token_dim"]))
    positions = [r["index"] for r in rows]
    if len(positions) != len(set(positions)):
        raise RuntimeError(f"precompute: {cache} holds a sample more than once")
    visual = [r for r in rows if r["num_tokens"]]
    kept = np.array([r["num_kept"] for r in visual] or [0])
    num_patches = identity_info["num_patches"]
    size = sum(storage.size(storage.join(cache, n)) for n in storage.listdir(cache, ".parquet"))
    per_source: dict[str, int] = {}
    for r in rows:
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1
    return CacheManifest(
        encoder=identity_info, trim=trim_cfg.to_dict(), samples=len(rows), visual_samples=len(visual),
        text_only_samples=len(rows) - len(visual), per_source=dict(sorted(per_source.items())),
        kept=KeptStats(mean=float(kept.mean()), median=float(np.median(kept)), min=int(kept.min()),
                       max=int(kept.max()), mean_share=float(kept.mean() / num_patches),
                       mean_tokens=float(np.mean([r["num_tokens"] for r in visual] or [0]))),
        cache_bytes=int(size), bytes_per_visual_sample=size / max(len(visual), 1),
        full_feature_bytes_per_image=num_patches * identity_info["feature_dim"] * 2, seconds=round(seconds, 2))


def log_precompute(recipe: Recipe, manifest: CacheManifest) -> CacheManifest:
    """Log a finished precompute to MLflow (run `<train.run_name>-precompute` in the recipe's
    experiment): kept-token statistics, the manifest and recipe.eval.num_pictures pictures of cached
    samples. Returns the manifest, so a job can `return log_precompute(...)`."""
    from pipelines.pictures import cache_pictures, log_pictures
    from pipelines.tracking import Tracker, default_tracking_uri, experiment_name

    paths = recipe.paths
    with Tracker(default_tracking_uri(paths.root), experiment_name(recipe.name)) as tracker:
        tracker.start(f"{recipe.train.run_name}-precompute")
        tracker.log_params({"trim": recipe.trim.to_dict(), "precompute": dataclasses.asdict(recipe.precompute),
                            "paths": {"shards": paths.shards, "cache": paths.cache, "clip": paths.clip}})
        kept = dataclasses.asdict(manifest.kept)
        tracker.log_metrics({f"kept_{k}": float(v) for k, v in kept.items()} | {
            "samples": float(manifest.samples), "visual_samples": float(manifest.visual_samples),
            "bytes_per_visual_sample": float(manifest.bytes_per_visual_sample)}, step=0)
        tracker.log_dict(manifest.to_dict(), "manifest.json")
        with tempfile.TemporaryDirectory() as directory:
            try:
                pictures = cache_pictures(paths.shards, paths.cache, directory, count=recipe.eval.num_pictures)
            except Exception as err:  # pictures are a courtesy: never fail the stage for them
                logger.warning("no pictures (%s: %s)", type(err).__name__, err)
                pictures = []
            log_pictures(tracker, pictures)
        if tracker.run_id:
            logger.info("logged %d pictures to MLflow run %s", len(pictures), tracker.run_id)
    return manifest
