"""Shard a 665K-row synthetic mixture with a pool of 30,000 small images as the job a user runs
(`jobs/shard.py`, its own local Ray), and again at 2M rows with the same pool: wall time, and the
driver process's peak RSS at 2M rows over at 665K rows (a driver that streams stays flat; one that
holds the records grows with them). `--naive` adds the single-process loop of naive_shard.py on the
665K input. `--quick` runs the same at 2,000 and 4,000 rows with 200 images. Ends with one
`RESULT {json}` line.

    python benchmarks/bench_shard.py [--rows 665000] [--big-rows 2000000] [--images 30000] [--naive] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import REPO, child_env, run_measured, table, tree_rss

from pipelines.manifests import ShardsManifest
from synthetic.mixture import write_mixture


def run_job(args: list[str], poll: float = 0.1) -> tuple[float, int, int, str]:
    """Run a command; (wall seconds, peak RSS of its own process, peak RSS of its process tree, output)."""
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    own = tree = 0
    while process.poll() is None:
        try:
            own = max(own, psutil.Process(process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            pass
        tree = max(tree, tree_rss(process.pid))
        time.sleep(poll)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{''.join(output)[-4000:]}")
    return time.perf_counter() - started, own, tree, "".join(output)


def mixture(work: Path, rows: int, images: int) -> Path:
    path = work / "data" / "llava_v1_5_mix665k.json"
    if not path.exists():
        started = time.perf_counter()
        write_mixture(work / "data", rows, images, seed=0, image_size=(64, 48))
        print(f"wrote {rows} rows, {images} images in {time.perf_counter() - started:.1f}s "
              f"({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    return path


def shard(work: Path) -> tuple[float, int, int, str]:
    shutil.rmtree(work / "shards", ignore_errors=True)
    return run_job([sys.executable, str(REPO / "jobs" / "shard.py"), "--set", f"paths.root={work}",
                    "--set", "shard.rows_per_shard=20000", "--set", "shard.images_per_shard=2000",
                    "--set", f"shard.concurrency={os.cpu_count()}"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--big-rows", type=int, default=2_000_000, help="the second run (0: skip it)")
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--naive", action="store_true", help="also time the single-process loop")
    parser.add_argument("--workdir", default="/tmp/bench-shard")
    parser.add_argument("--quick", action="store_true", help="2,000 and 4,000 rows, 200 images: seconds")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.big_rows, args.images = 2_000, 4_000, 200
    work = Path(args.workdir)
    runs = {}
    for rows in [args.rows] + ([args.big_rows] if args.big_rows else []):
        folder = work / f"rows-{rows}-images-{args.images}"
        path = mixture(folder, rows, args.images)
        runs[rows] = shard(folder)
        manifest = ShardsManifest.read(str(folder / "shards"))  # the version CURRENT.json names
        print(f"{rows} rows ({path.stat().st_size / 2**20:.0f} MiB): {runs[rows][0]:.1f} s, driver peak RSS "
              f"{runs[rows][1] / 2**20:.0f} MiB, process tree {runs[rows][2] / 2**30:.2f} GiB; "
              f"{manifest.samples} samples, {manifest.images} images", flush=True)
    rows = [[f"ray data job, {n} rows", wall, own / 2**20, tree / 2**30] for n, (wall, own, tree, _) in runs.items()]
    result = {"seconds": round(runs[args.rows][0], 2), "driver_peak_rss_mb": round(runs[args.rows][1] / 2**20, 1)}
    if args.big_rows:
        result["driver_rss_ratio"] = round(runs[args.big_rows][1] / runs[args.rows][1], 3)
        result["seconds_big"] = round(runs[args.big_rows][0], 2)
    if args.naive:
        folder = work / f"rows-{args.rows}-images-{args.images}"
        shutil.rmtree(folder / "naive", ignore_errors=True)
        wall, peak, _ = run_measured([sys.executable, str(REPO / "benchmarks" / "naive_shard.py"),
                                      str(folder / "data" / "llava_v1_5_mix665k.json"), str(folder / "data" / "images"),
                                      str(folder / "naive")])
        rows.append([f"naive loop, {args.rows} rows", wall, peak / 2**20, peak / 2**30])
        result["speedup_over_naive"] = round(wall / runs[args.rows][0], 2)
    print(table(rows, ["shard", "wall s", "driver peak RSS MiB", "tree peak RSS GiB"]))
    print("targets: seconds <= 60 at 665K rows; driver_rss_ratio <= 1.2")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
