"""Shared by the benchmarks: peak RSS of a whole process tree, timing a command, a results table."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (Ray workers included), in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def status_mb(field: str) -> float:
    """One memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB (Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_rss_mb() -> float:
    """This process's peak RSS since it started, in MiB: VmHWM, which exec resets. Not ru_maxrss: a
    process started by spawn or subprocess inherits the peak of the parent it was forked from."""
    return status_mb("VmHWM")


def child_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a job a benchmark runs: its own local Ray (no RAY_ADDRESS), no progress bars,
    and this checkout first on PYTHONPATH, so the job's Ray workers (started by the raylet from this
    environment) import the code measured here rather than whichever checkout the virtualenv installed."""
    env = dict(os.environ, TRIM_PROGRESS="0", **(extra or {}))
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_measured(args: list[str], env: dict | None = None, poll: float = 0.2) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS of its process tree, combined output)."""
    full_env = child_env(env)
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(poll)
    reader.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{''.join(output)[-4000:]}")
    return wall, peak, "".join(output)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)
