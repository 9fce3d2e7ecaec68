"""Batched `trim_tokens` against the per-sample loop it replaced (tests/unit/trim/reference_trim.py)
on one realistic batch: B images of N = 576 patches, D = 1024 features, E = 768 embeddings. Checks
the outputs agree, prints both times (median of the repeats) and ends with one RESULT line.

`trim_over_floor` holds the batched time against the floor its bit-exact contract sets: one read of
the features (the aggregate's fp32 sums) plus the reference's score product (similarity and
softmax), both timed in the same run; target <= 1.5. `trim_speedup` (over the loop) is information.

    python benchmarks/bench_trim.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                    [--batch 256] [--patches 576] [--repeats 5] [--preset default] [--quick]

`time_trim(device, dtype, B, N)` returns the same figures as a dict (benchmarks/gpu_check.py).
Both run on the chosen device; should the reference fail there, it is timed once on the host copy
of the inputs instead ("reference_device" says where it ran), and the two outputs, scored on
different devices, may then differ in the last bits ("equal" says where). Runs with PyTorch's
THP_MEM_ALLOC_ENABLE=1, as the precompute workers do (THP_MEM_ALLOC_ENABLE=0 to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# As the precompute workers run (pipelines.ray_cluster.WORKER_DEFAULTS): PyTorch reads it at its first
# allocation, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit" / "trim"))

from reference_trim import reference_patch_scores, reference_trim_tokens  # noqa: E402

from trim import TrimConfig, trim_tokens  # noqa: E402


def make_inputs(batch: int, patches: int, dim: int = 1024, embed: int = 768, seed: int = 0):
    """Gaussian features and embeddings; embedding norms ~20, where the released scoring keeps a
    share of patches like the paper's ~20%."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, patches, dim, generator=generator)
    patch_embeds = torch.randn(batch, patches, embed, generator=generator) * 0.7
    text_embeds = torch.randn(batch, embed, generator=generator) * 0.7
    return features, patch_embeds, text_embeds


def _median_seconds(fn, repeats: int, device: torch.device):
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def compare(new, ref) -> dict:
    """How the two outputs agree: everything but the aggregate token must be equal bit for bit;
    the aggregate (an fp32 mean, summed in another order) is reported as its largest difference."""
    same = {
        "keep_mask": torch.equal(new.keep_mask.cpu(), ref.keep_mask.cpu()),
        "scores": torch.equal(new.scores.cpu(), ref.scores.cpu()),
        "num_kept": torch.equal(new.num_kept.cpu(), ref.num_kept.cpu()),
        "has_aggregate": torch.equal(new.has_aggregate.cpu(), ref.has_aggregate.cpu()),
    }
    kept_equal, aggregate_diff = len(new.tokens) == len(ref.tokens), 0.0
    for a, b, has in zip(new.tokens, ref.tokens, ref.has_aggregate.tolist()):
        a, b = a.cpu(), b.cpu()
        if a.shape != b.shape or a.dtype != b.dtype:
            kept_equal = False
            continue
        k = a.shape[0] - int(has)
        kept_equal &= torch.equal(a[:k], b[:k])
        if has:
            aggregate_diff = max(aggregate_diff, float((a[k].float() - b[k].float()).abs().max()))
    same["kept_tokens"] = kept_equal
    return {"identical": all(same.values()), "equal": same, "max_aggregate_diff": aggregate_diff}


def time_trim(device: str, dtype: torch.dtype | str, B: int, N: int, D: int = 1024, E: int = 768,
              repeats: int = 5, preset: str = "default") -> dict:
    """Reference and batched trim_tokens on one batch: median seconds, speedup and agreement."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    target = torch.device(device)
    cfg = TrimConfig.preset(preset)
    host = [t.to(dtype) for t in make_inputs(B, N, D, E)]
    inputs = [t.to(target) for t in host]
    trim_tokens(*inputs, cfg)  # warm-up: lazy initialisation (thread pools, CUDA context, kernels)
    vectorized_s, new = _median_seconds(lambda: trim_tokens(*inputs, cfg), repeats, target)
    read_s, _ = _median_seconds(lambda: inputs[0].sum(dim=1, dtype=torch.float32), repeats, target)
    score_s, _ = _median_seconds(lambda: reference_patch_scores(inputs[1], inputs[2], cfg), repeats, target)
    reference_device = target
    try:
        reference_s, ref = _median_seconds(lambda: reference_trim_tokens(*inputs, cfg), repeats, target)
    except RuntimeError:  # today's code on a device it cannot run on: time it once on the host
        reference_device = torch.device("cpu")
        reference_s, ref = _median_seconds(lambda: reference_trim_tokens(*host, cfg), 1, reference_device)
    return {
        "device": str(target), "dtype": str(dtype).replace("torch.", ""), "B": B, "N": N, "D": D, "E": E,
        "preset": preset, "reference_device": str(reference_device), "reference_s": reference_s,
        "vectorized_s": vectorized_s, "trim_speedup": reference_s / vectorized_s,
        "floor_read_s": read_s, "floor_score_s": score_s, "trim_over_floor": vectorized_s / (read_s + score_s),
        "kept_share": float(new.num_kept.float().mean()) / N, **compare(new, ref),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--patches", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--quick", action="store_true", help="B=16, 2 repeats: the same code in seconds")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 16, 2
    figures = time_trim(args.device, args.dtype, args.batch, args.patches, repeats=args.repeats, preset=args.preset)
    for key, value in figures.items():
        print(f"{key}: {value}")
    if figures["reference_device"] == figures["device"] and not figures["identical"]:
        print("outputs differ from the reference", file=sys.stderr)
        sys.exit(1)
    result = {k: round(figures[k], 4) for k in ("trim_over_floor", "trim_speedup", "reference_s", "vectorized_s",
                                                "floor_read_s", "floor_score_s")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
