"""Shard a 665K-row synthetic mixture (a pool of small images): the Ray Data job beside a naive
single-process loop, on the same input, in one run. Prints wall time, peak RSS and their ratios.

    python benchmarks/bench_shard.py [--rows 665000] [--images 3000] [--workdir /tmp/bench-shard]
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from common import REPO, run_measured, table

from pipelines.synthetic import write_mixture


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workdir", default="/tmp/bench-shard")
    args = parser.parse_args()
    work = Path(args.workdir)
    data = work / "data"
    mixture = data / "llava_v1_5_mix665k.json"
    if not mixture.exists():
        started = time.perf_counter()
        write_mixture(data, args.rows, args.images, seed=0, image_size=(64, 48))
        print(f"wrote {args.rows} rows, {args.images} images in {time.perf_counter() - started:.1f}s")
    print(f"mixture: {mixture.stat().st_size / 2**20:.0f} MiB")

    shutil.rmtree(work / "shards", ignore_errors=True)
    ours_wall, ours_rss, ours_out = run_measured(
        [sys.executable, str(REPO / "jobs" / "shard.py"), "--set", f"paths.root={work}",
         "--set", "shard.rows_per_shard=50000", "--set", "shard.images_per_shard=2000"])
    shutil.rmtree(work / "naive", ignore_errors=True)
    naive_wall, naive_rss, naive_out = run_measured(
        [sys.executable, str(REPO / "benchmarks" / "naive_shard.py"), str(mixture), str(data / "images"),
         str(work / "naive")])
    print("\n".join(line for line in (ours_out + naive_out).splitlines() if line.startswith(("shard:", "naive:"))))
    print(table([["ray data job", ours_wall, ours_rss / 2**30], ["naive loop", naive_wall, naive_rss / 2**30]],
                ["shard 665K rows", "wall s", "peak RSS GiB"]))
    print(f"speed-up over the naive loop: {naive_wall / ours_wall:.2f}x; "
          f"RSS ratio (ours/naive): {ours_rss / naive_rss:.2f}; targets: <= 60 s, <= 4 GiB, faster than naive")


if __name__ == "__main__":
    main()
