"""The serving section: benchmarks/bench_serve.py (the OpenAI-compatible Ray Serve app with the tiny model,
concurrent `openai` clients, TRIM and all 576 tokens) run on this node, its ratio of throughput through
the server to the in-process Answerer recorded. Where Ray Serve or the `openai` client is not
installed (the GPU node as lent has neither), the section says so under `skipped`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from gpu_sections.run import Run

BENCH = Path(__file__).resolve().parent.parent / "bench_serve.py"
KEYS = ("serve_over_answerer", "questions_per_s_trim", "questions_per_s_full", "mean_batch_size", "p50_latency_s",
        "p95_latency_s")


def serve_section(run: Run) -> None:
    missing = [name for name in ("ray", "openai") if importlib.util.find_spec(name) is None]
    if not missing and importlib.util.find_spec("ray.serve") is None:
        missing = ["ray.serve"]
    if missing:
        run.results["skipped"]["serve"] = f"Ray Serve cannot run here: {', '.join(missing)} not installed"
        run.log(f"== serve: skipped ({run.results['skipped']['serve']})")
        return
    args = [sys.executable, str(BENCH), *(["--quick"] if run.tiny else [])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"bench_serve.py failed ({done.returncode}): {(done.stdout + done.stderr)[-400:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    run.put(**{f"serve_{key}" if not key.startswith("serve_") else key: result[key] for key in KEYS})
