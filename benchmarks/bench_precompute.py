"""Precompute throughput on the CPU: images/s through the streaming Ray Data job (CPU tasks decode,
pad, resize and tokenize; the encoder actor runs CLIP to layer -2, the text tower and TRIM and writes
the parts) divided by images/s of the same encoder's work in one process on already-preprocessed
inputs (vision to layer -2 + texts, batched). The raw forward and the job alternate (raw, job, raw,
job, ..., raw); each job is held against the faster of the raw runs either side of it (on a shared
machine another process's burst slows one of them: conservative, never flattering), and
`pipeline_over_raw` is the median of those ratios, so one noisy run decides nothing (target >= 0.85).
Also: the driver's peak RSS during the job; trim_tokens (benchmarks/bench_trim.py at B=256, N=576):
`trim_over_floor`, the batched time over one read of the features plus the reference's score product
(target <= 1.5), and `trim_speedup` over the per-sample loop (information). The job runs in a child
process that starts its own Ray first, so the timing and the driver's peak RSS are the job's alone.
`--quick` runs the same at 32 images, a narrow encoder and one repeat. Ends with one `RESULT {json}` line.

    python benchmarks/bench_precompute.py [--images 1000] [--width 384] [--depth 6] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The raw forward runs in this process: with huge pages for large CPU tensors like the pipeline's
# workers (pipelines.ray_cluster.WORKER_DEFAULTS). PyTorch reads it at its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from bench_trim import time_trim
from common import REPO, child_env, peak_rss_mb, table
from PIL import Image

from pipelines import storage
from pipelines.config import PrecomputeConfig, ShardConfig
from pipelines.manifests import CacheManifest, ShardsManifest, resolve_output
from trim import TrimConfig

PRESET = TrimConfig.paper()


def child(args: argparse.Namespace) -> None:
    """The measured job, alone in this process: shard (untimed) or precompute (timed)."""
    from pipelines.logs import setup_logging
    from pipelines.precompute.stage import run_precompute
    from pipelines.ray_cluster import init_ray
    from pipelines.shard.stage import run_shard

    setup_logging()
    os.environ["TRIM_PROGRESS"] = "0"
    init_ray(num_cpus=os.cpu_count())
    _warm_up()
    work = Path(args.workdir)
    if args.child == "shard":
        run_shard(str(work / "data" / "llava_v1_5_mix665k.json"), str(work / "data" / "images"), str(work / "shards"),
                  ShardConfig(concurrency=os.cpu_count() or 1))
        return
    shutil.rmtree(work / "cache", ignore_errors=True)
    # The actor asks Ray for one CPU (the others run the decode tasks) and runs a torch thread per core.
    cfg = PrecomputeConfig(batch_size=args.batch, concurrency=1, num_cpus_per_actor=1, encoder_threads=args.threads,
                           rows_per_file=args.rows_per_file)
    started = time.perf_counter()
    manifest = run_precompute(str(work / "shards"), str(work / "cache"), str(work / "clip"), PRESET, cfg)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    print("CHILD " + json.dumps({"seconds": seconds, "driver_peak_rss_mb": peak, "manifest": manifest.to_dict(),
                                 "steady_images_per_s": steady_rate(work / "cache")}))


def _warm_up() -> None:
    """Start a worker per CPU with the stage's modules imported, as a cluster that has run before has
    them: the timing is the pipeline's, not Python's start-up on a cold 2-core machine."""
    import ray

    @ray.remote(num_cpus=1)
    def ready() -> int:
        import pipelines.precompute.prepare  # noqa: F401

        return 0

    ray.get([ready.remote() for _ in range(os.cpu_count() or 1)])


def steady_rate(cache: Path) -> float | None:
    """Images/s between the first and the last image part written (start-up and the shuffle left out);
    None when the images landed in one part (no interval to measure). Only the parts the current
    version's manifest lists are read."""
    folder = resolve_output(str(cache))
    names = [name for name in CacheManifest.read(folder).files if name.startswith("part-i")]
    parts = sorted((os.stat(storage.join(folder, name)).st_mtime, storage.join(folder, name)) for name in names)
    if len(parts) < 2:
        return None
    images = sum(len(set(storage.read_parquet(p, columns=["image_key"]).column(0).to_pylist()))
                 for _, p in parts[1:])
    return images / (parts[-1][0] - parts[0][0])


def raw_rates(work: Path, batch: int) -> tuple[float, float, int, int]:
    """(images/s of vision + texts, images/s of vision alone, images, image samples): the encoder's
    batched forward in this process on pixels preprocessed beforehand."""
    from pipelines.precompute.stage import load_samples
    from trim.encoders import ClipEncoder

    encoder = ClipEncoder(work / "clip")
    shards = resolve_output(str(work / "shards"))  # the current version: only the files its manifest lists
    listed = ShardsManifest.read(shards).files
    data = [row["bytes"] for name in sorted(listed) if name.startswith("images-")
            for row in storage.read_parquet(storage.join(shards, name)).to_pylist()]
    pixels = [encoder.preprocess([Image.open(io.BytesIO(b)) for b in data[i:i + batch]])
              for i in range(0, len(data), batch)]
    texts = [s["text"] for s in load_samples(shards, PRESET) if s["image_key"]]
    tokens = [encoder.host.tokenize(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    encoder.encode_pixels(pixels[0])  # warm-up
    started = time.perf_counter()
    for chunk in pixels:
        encoder.encode_pixels(chunk)
    vision = time.perf_counter() - started
    started = time.perf_counter()
    for ids, mask in tokens:
        encoder.towers.encode_tokens(ids, mask)
    text = time.perf_counter() - started
    return len(data) / (vision + text), len(data) / vision, len(data), len(texts)


def run_child(args: argparse.Namespace, stage: str) -> dict:
    command = [sys.executable, __file__, "--child", stage, "--workdir", args.workdir, "--batch", str(args.batch),
               "--threads", str(args.threads), "--rows-per-file", str(args.rows_per_file)]
    out = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("CHILD ")]
    return json.loads(lines[-1][len("CHILD "):]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--width", type=int, default=384, help="encoder width (compute-bound like ViT-L)")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the actor")
    parser.add_argument("--rows-per-file", type=int, default=64, help="samples per unit (part)")
    parser.add_argument("--trim-batch", type=int, default=256, help="B of the trim_tokens timing (0: skip it)")
    parser.add_argument("--repeats", type=int, default=3, help="job runs, each between two raw runs")
    parser.add_argument("--workdir", default="/tmp/bench-precompute")
    parser.add_argument("--quick", action="store_true", help="32 images, width 64, depth 2, one repeat, B=16 trim")
    parser.add_argument("--child", choices=["shard", "precompute"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.width, args.depth, args.repeats, args.trim_batch = 32, 64, 2, 1, 16
    if args.child:
        return child(args)
    from synthetic.mixture import write_mixture
    from synthetic.tiny_models import build_tiny_clip

    work = Path(args.workdir)
    if not (work / "clip" / "config.json").exists() or json.loads((work / "clip" / "config.json").read_text())[
            "vision_config"]["hidden_size"] != args.width:
        shutil.rmtree(work, ignore_errors=True)
        build_tiny_clip(work / "clip", width=args.width, depth=args.depth, projection_dim=256)
    if ShardsManifest.read_if_exists(str(work / "shards")) is None:
        write_mixture(work / "data", num_samples=args.images * 2, num_images=args.images, seed=1)
        run_child(args, "shard")
    raws = [raw_rates(work, args.batch)]
    jobs, ratios = [], []
    for _ in range(args.repeats):
        jobs.append(run_child(args, "precompute"))
        raws.append(raw_rates(work, args.batch))
        fair = max(raws[-2][0], raws[-1][0])
        ratios.append(raws[0][2] / jobs[-1]["seconds"] / fair)
    images, samples = raws[0][2], raws[0][3]
    # The repeat whose ratio is the median one stands for the run (its rates, RSS and cache).
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    job = jobs[middle]
    raw = max(raws[middle][0], raws[middle + 1][0])
    vision = max(raws[middle][1], raws[middle + 1][1])
    rate = images / job["seconds"]
    print(f"{images} distinct images ({samples} image samples), encoder width {args.width}, depth {args.depth}, "
          f"batch {args.batch}, actor torch threads {args.threads}, {os.cpu_count()} CPUs")
    print("pipeline / raw of each repeat: " + ", ".join(f"{r:.3f}" for r in ratios)
          + f"; median {statistics.median(ratios):.3f}")
    print(table([["raw forward, vision to layer -2 only, 1 process", vision, vision / raw],
                 ["raw forward, vision + texts, 1 process", raw, 1.0],
                 ["ray data job (decode tasks + 1 encoder actor)", rate, rate / raw]],
                ["precompute", "images/s", "ratio to raw"]))
    manifest = job["manifest"]
    per_sample, full = manifest["bytes_per_visual_sample"], manifest["full_feature_bytes_per_image"]
    print(f"cache bytes per sample ({PRESET.similarity} scoring, kept mean {manifest['kept']['mean']:.1f} of 576): "
          f"{per_sample:.0f} B / full {full} B = {per_sample / full:.4f}")
    steady = job["steady_images_per_s"]
    print("steady state (first to last part written): "
          + (f"{steady:.3f} images/s = {steady / raw:.3f} x raw" if steady else "n/a (the images fit one part)"))
    result = {"pipeline_over_raw": round(statistics.median(ratios), 4), "pipeline_images_per_s": round(rate, 3),
              "pipeline_over_raw_repeats": [round(r, 4) for r in ratios],
              "steady_over_raw": round(steady / raw, 4) if steady else None,
              "raw_images_per_s": round(raw, 3), "driver_peak_rss_mb": round(job["driver_peak_rss_mb"], 1),
              "cache_bytes_ratio": round(per_sample / full, 4)}
    if args.trim_batch:
        trim = time_trim("cpu", torch.float32, args.trim_batch, 576)
        print(f"trim_tokens at B={args.trim_batch}, N=576: per-sample loop {trim['reference_s']:.3f} s, batched "
              f"{trim['vectorized_s']:.3f} s, floor (one read of the features {trim['floor_read_s']:.3f} s + the "
              f"reference's score product {trim['floor_score_s']:.3f} s), identical outputs: {trim['identical']}")
        result["trim_over_floor"] = round(trim["trim_over_floor"], 3)
        result["trim_speedup"] = round(trim["trim_speedup"], 2)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
