"""Peak memory of the shard and precompute jobs, on hostile wide images and on ordinary ones, side by side.

    python benchmarks/bench_memory.py [--root /tmp/bench-memory] [--cap-gb 4] [--quick]

Two run roots, each with its own mixture: `wide`, five 18000 x 900 PNGs of about 18 KB each (inside the
default caps on pixels and aspect ratio; padded to squares at full resolution they would take 1.3 GB
each), and `ordinary`, 120 photos of 640 x 480 (JPEG). Each runs `jobs/shard.py` then
`jobs/precompute.py` (its MLflow picture step included) as its own process with its own local Ray, and
the peak of the summed PSS (proportional set size: shared pages, Ray's object store among them, counted
once) of the job's whole process tree is sampled every 0.2 s. With --cap-gb, each job also runs in a
memory cgroup of that size (cgroup v1, where this machine lets one be made), so a job that needed more
would be killed, not merely measured.

Ends with `RESULT {json}`: per case and job the peak in MiB, and the wide case's peaks over the ordinary
case's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CGROUP = Path("/sys/fs/cgroup/memory")
TURNS = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Colours."}]


def write_case(root: Path, kind: str, count: int) -> None:
    """The mixture and image folder of one case under root/data: `count` images."""
    images = root / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    if kind == "wide":
        for n in range(count):
            Image.new("RGB", (18000, 900), (40 * n, 120, 200)).save(images / f"wide{n}.png")
            records.append({"id": f"wide-{n}", "image": f"wide{n}.png", "conversations": TURNS})
    else:
        for n in range(count):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            photo = Image.fromarray(pixels).resize((640, 480), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            photo.save(buffer, format="JPEG", quality=90)
            (images / f"photo{n}.jpg").write_bytes(buffer.getvalue())
            records += [{"id": f"photo-{n}-{k}", "image": f"photo{n}.jpg", "conversations": TURNS} for k in range(2)]
    (root / "data" / "llava_v1_5_mix665k.json").write_text(json.dumps(records))


def tree_pss(pid: int, workers: dict[str, int]) -> int:
    """Summed PSS (else RSS) in bytes of a process and all its descendants; `workers` keeps the peak
    PSS of each kind of Ray worker (its process title, "ray::<task or actor>")."""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            title = proc.cmdline()[0] if proc.cmdline() else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss = getattr(info, "pss", info.rss)
        total += pss
        if title.startswith("ray::") and "IDLE" not in title:
            name = title.split()[0]
            workers[name] = max(workers.get(name, 0), pss)
    return total


def run_job(job: str, root: Path, clip: Path, cap_gb: float, workers: dict[str, int]) -> int:
    """Run one job to its end; returns its tree's peak PSS in bytes (and each kind of Ray worker's in
    `workers`). Raises if the job fails."""
    cmd = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--set", f"paths.root={root}",
           "--set", f"paths.clip={clip}", "--set", "shard.concurrency=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), TRIM_PROGRESS="0")
    group = _cgroup(f"bench-memory-{os.getpid()}", cap_gb) if cap_gb else None

    def enter_group() -> None:  # in the child, before the job starts: it and all it starts are capped
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=enter_group)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid, workers))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    sampler.join()
    if group is not None:
        failcnt = int((group / "memory.failcnt").read_text())
        for _ in range(60):  # Ray's processes may outlive the driver by a few seconds
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(1)
        if failcnt:
            print(f"{job}: the {cap_gb} GB cap was hit {failcnt} times")
    if proc.returncode:
        raise RuntimeError(f"{job} failed ({proc.returncode}):\n{output[-3000:]}")
    return peak[0]


def _cgroup(name: str, cap_gb: float) -> Path | None:
    """A cgroup v1 memory group of cap_gb, or None where none can be made here."""
    group = CGROUP / name
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(cap_gb * 2**30)))
        return group
    except OSError:
        print(f"no memory cgroup could be made under {CGROUP}: measured without a cap")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/bench-memory")
    parser.add_argument("--cap-gb", type=float, default=4.0, help="0: no cgroup cap")
    parser.add_argument("--quick", action="store_true", help="2 wide images and 8 photos (a smoke run)")
    args = parser.parse_args()
    counts = {"wide": 2, "ordinary": 8} if args.quick else {"wide": 5, "ordinary": 120}
    from synthetic.tiny_models import build_tiny_models

    base = Path(args.root)
    clip = build_tiny_models(base / "models").clip
    peaks: dict[str, int] = {}
    for kind in ("wide", "ordinary"):
        root = base / kind
        shutil.rmtree(root / "data", ignore_errors=True)
        write_case(root, kind, counts[kind])
        for output in ("shards", "cache"):  # measured from scratch, not a rerun that finds them complete
            shutil.rmtree(root / output, ignore_errors=True)
        for job in ("shard", "precompute"):
            workers: dict[str, int] = {}
            peaks[f"{job}_{kind}_peak_mib"] = round(run_job(job, root, clip, args.cap_gb, workers) / 2**20)
            each = ", ".join(f"{name} {pss / 2**20:.0f} MiB" for name, pss in sorted(workers.items()))
            print(f"{kind}: {job} peak {peaks[f'{job}_{kind}_peak_mib']} MiB (PSS of the job's process tree); "
                  f"per Ray worker: {each}")
    result = dict(peaks, cap_gb=args.cap_gb, images=counts,
                  shard_wide_over_ordinary=round(peaks["shard_wide_peak_mib"] / peaks["shard_ordinary_peak_mib"], 2),
                  precompute_wide_over_ordinary=round(
                      peaks["precompute_wide_peak_mib"] / peaks["precompute_ordinary_peak_mib"], 2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
