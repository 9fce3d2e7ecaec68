"""Precompute throughput: images/s through the Ray Data job (actor pool, decode, preprocess, CLIP,
TRIM, Parquet) divided by images/s of the same encoder's raw batched forward in one process on
already-preprocessed inputs; and the cache's bytes per sample divided by the full 576 x D fp16
features, with the `paper` preset. One run, same inputs.

    python benchmarks/bench_precompute.py [--images 240] [--width 384] [--depth 6]
"""

import argparse
import io
import os
import shutil
import time
from pathlib import Path

import torch
from common import table
from PIL import Image

from pipelines import storage
from pipelines.config import PrecomputeConfig, ShardConfig
from pipelines.precompute import load_samples, run_precompute
from pipelines.runtime import init_ray
from pipelines.shard import run_shard
from pipelines.synthetic import write_mixture
from trim import TrimConfig
from trim.encoders import ClipEncoder
from trim.tiny import build_tiny_clip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--width", type=int, default=384, help="encoder width (compute-bound like ViT-L)")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/bench-precompute")
    args = parser.parse_args()
    work = Path(args.workdir)
    clip = work / f"clip-{args.width}x{args.depth}"
    if not (clip / "config.json").exists():
        build_tiny_clip(clip, width=args.width, depth=args.depth, projection_dim=256)
    mixture = write_mixture(work / "data", num_samples=args.images * 2, num_images=args.images, seed=1)
    init_ray(num_cpus=os.cpu_count())
    shard_manifest = run_shard(str(mixture), str(work / "data" / "images"), str(work / "shards"),
                               ShardConfig(concurrency=2))
    images = shard_manifest.images

    # Raw: the encoder's batched forward alone, inputs decoded and preprocessed beforehand.
    encoder = ClipEncoder(clip)
    data = [row["bytes"] for name in storage.listdir(str(work / "shards"), ".parquet") if name.startswith("images-")
            for row in storage.read_parquet(str(work / "shards" / name)).to_pylist()]
    pixels = [encoder.preprocess([Image.open(io.BytesIO(b)) for b in data[i:i + args.batch]])
              for i in range(0, len(data), args.batch)]
    texts = [s["text"] for s in load_samples(str(work / "shards"), TrimConfig.paper()) if s["image_key"]]
    encoder.encode_pixels(pixels[0])  # warm-up
    started = time.perf_counter()
    for batch in pixels:
        encoder.encode_pixels(batch)
    vision_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(texts), args.batch):
        encoder.encode_texts(texts[i:i + args.batch])
    text_seconds = time.perf_counter() - started
    vision_rate = len(data) / vision_seconds
    raw_rate = len(data) / (vision_seconds + text_seconds)  # the same CLIP work: images and their texts
    del encoder, pixels

    rows = []
    cpus = os.cpu_count() or 1
    for concurrency, threads in ((1, cpus), (cpus, 1)):
        cache = work / f"cache-{concurrency}"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        manifest = run_precompute(str(work / "shards"), str(cache), str(clip), TrimConfig.paper(),
                                  PrecomputeConfig(batch_size=args.batch, concurrency=concurrency,
                                                   num_cpus_per_actor=threads, rows_per_file=10_000))
        rate = images / (time.perf_counter() - started)
        rows.append([f"ray data, {concurrency} actor(s) x {threads} thread(s)", rate, rate / raw_rate])
    rows.insert(0, ["raw forward, vision + texts, 1 process", raw_rate, 1.0])
    rows.insert(0, ["raw forward, vision only, 1 process", vision_rate, vision_rate / raw_rate])
    print(f"{images} distinct images ({len(texts)} image samples, {shard_manifest.samples} in all), "
          f"encoder width {args.width}, depth "
          f"{args.depth}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(table(rows, ["precompute", "images/s", "ratio to raw"]))
    full = manifest.full_feature_bytes_per_image
    per_sample = manifest.bytes_per_visual_sample
    print(f"cache bytes per sample (paper preset, kept mean {manifest.kept.mean:.1f} of 576): "
          f"{per_sample:.0f} B / full 576x{args.width} fp16 {full} B = {per_sample / full:.4f} (target <= 0.23)")
    best = max(r[1] for r in rows[2:])
    print(f"best pipeline / raw (vision + texts): {best / raw_rate:.3f} (target >= 0.85); "
          f"/ raw vision only: {best / vision_rate:.3f}")


if __name__ == "__main__":
    main()
