"""What TRIM buys on one GPU, full vs TRIM side by side: the training step, inference, the precompute
encoder stage, and the training engine as the workers run it.

    python benchmarks/gpu_check.py [--tiny] [--out DIR] [--geometries 7b,13b] [--only engine,eval_7b]

The model sections need only torch, transformers, numpy, PIL (torchvision optional) and `trim/`: random
weights at vicuna-7B/13B and CLIP ViT-L/14-336 geometry, bf16, built on the device. The engine section
needs DeepSpeed too (benchmarks/build_wheelhouse.py brings it to a node without it). `--tiny` runs the
same code at tiny sizes on the CPU. Each section is guarded: a failure is printed and recorded, the
others still run. The last line is `RESULT {json}`. docs/gpu.md says what each figure means.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


import transformers  # noqa: E402
from gpu_sections.encoder import encoder_section, gpu_decode_section, preprocess_section  # noqa: E402
from gpu_sections.engine import engine_section  # noqa: E402
from gpu_sections.inference import eval_section, graph_section, prefill_section  # noqa: E402
from gpu_sections.run import GPU_SIZES, TINY_SIZES, Run, free_memory  # noqa: E402
from gpu_sections.serve import serve_section  # noqa: E402
from gpu_sections.train import train_section  # noqa: E402


def environment(run: Run) -> dict:
    try:
        import torchvision

        vision_version = torchvision.__version__
    except ImportError:
        vision_version = None
    name = torch.cuda.get_device_name() if run.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "torchvision": vision_version, "cuda": torch.version.cuda, "dtype": str(run.dtype), "tiny": run.tiny}


def summary(results: dict) -> str:
    rows = [("train step full padded / TRIM padded", "step_ratio_padded"), ("token ratio full / TRIM", "token_ratio"),
            ("train step full packed / TRIM packed", "step_ratio_packed"),
            ("  ... over the token ratio", "packed_over_token_ratio"), ("packed attention", "packed_attn"),
            ("TTFT b1 eager full / TRIM", "ttft_b1_eager_ratio"), ("TTFT b1 graph full / TRIM", "ttft_b1_graph_ratio"),
            ("TTFT b1 low-latency full / TRIM", "ttft_b1_lowlatency_ratio"),
            ("prefill b16 full / TRIM", "prefill_b16_ratio"),
            ("eval questions/s b16 TRIM / full (low-latency)", "eval_questions_per_s_ratio"),
            ("eval questions/s b16 TRIM / full (eager)", "eval_questions_per_s_ratio_eager"),
            ("  ... TRIM's counts varied, batches as drawn", "eval_questions_per_s_ratio_varied"),
            ("  ... TRIM's counts varied, batches by length", "eval_questions_per_s_ratio_sorted"),
            ("TTFT b1 eager 13B full / TRIM", "ttft_b1_eager_ratio_13b"),
            ("engine step full / TRIM (DeepSpeed ZeRO-3)", "engine_step_ratio"),
            ("  ... token ratio", "engine_token_ratio"),
            ("engine resumed loss = uninterrupted", "engine_resume_next_loss_equal"),
            ("engine losses finite / falling", "engine_loss_decreasing"),
            ("decode ms/token full", "decode_ms_per_token_full"), ("decode ms/token TRIM", "decode_ms_per_token_trim"),
            ("encoder raw images/s", "encoder_raw_images_per_s"),
            ("encoder stage images/s", "encoder_stage_images_per_s"),
            ("encoder stage / raw", "encoder_stage_over_raw"),
            ("CPU preprocess images/s/core", "cpu_preprocess_images_per_s_per_core"),
            ("GPU decode images/s", "gpu_decode_images_per_s"), ("GPU decode max abs diff", "gpu_decode_max_abs_diff")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {results.get(key, '-')}" for label, key in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, under a minute)")
    parser.add_argument("--out", type=Path, help="directory for result.json and log.txt")
    parser.add_argument("--geometries", default="7b,13b", help="LLM geometries for prefill (7b always trains)")
    parser.add_argument("--packed-attn", default=None,
                        help="attention implementations to try for packed rows, in order "
                             "(default flex_attention,sdpa on CUDA, sdpa_packed on CPU: see trim/attention.py)")
    parser.add_argument("--deadline-s", type=float, default=240.0,
                        help="optional sections (graphs, 13B) are skipped once this many seconds have passed")
    parser.add_argument("--skip", default="", help="sections not to run, e.g. train_7b,prefill_13b (see the log's ==)")
    parser.add_argument("--only", default="", help="run these sections alone, e.g. engine,eval_7b")
    parser.add_argument("--engine-layers", type=int, default=4,
                        help="decoder layers of the engine section's Llama at vicuna-7B's layer shapes "
                             "(4: ~1.07B parameters; 32: 7B)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(device, TINY_SIZES if args.tiny else GPU_SIZES, args.tiny, args.deadline_s, args.out)
    run.skip_sections = set(filter(None, args.skip.split(",")))
    run.only_sections = set(filter(None, args.only.split(",")))
    run.engine_layers = args.engine_layers
    default_attn = "flex_attention,sdpa" if device.type == "cuda" else "sdpa_packed"
    run.results["packed_attn_tried"] = (args.packed_attn or default_attn).split(",")
    run.results.update(environment(run))
    run.log(f"gpu_check on {run.results['device']}: torch {torch.__version__}, transformers {transformers.__version__}")
    geometries = [g for g in args.geometries.split(",") if g]
    run.section("train_7b", train_section)
    run.section("prefill_7b", lambda r: prefill_section(r, "7b"))
    run.section("encoder", encoder_section)
    run.section("preprocess_cpu", preprocess_section)
    run.section("gpu_decode", gpu_decode_section)
    run.section("graph_7b", lambda r: graph_section(r, "7b"), optional=True)
    run.section("eval_7b", eval_section, optional=True)
    run.models.pop("7b", None)
    free_memory(run)
    for geometry in (g for g in geometries if g != "7b"):
        run.section(f"prefill_{geometry}", lambda r, g=geometry: prefill_section(r, g), optional=True)
        run.section(f"graph_{geometry}", lambda r, g=geometry: graph_section(r, g), optional=True)
        run.models.pop(geometry, None)
    free_memory(run)
    run.section("engine", engine_section)
    run.section("serve", serve_section)
    run.results["total_s"] = round(time.perf_counter() - run.start, 1)
    run.log("summary:\n" + summary(run.results))
    line = "RESULT " + json.dumps(run.results, sort_keys=True)
    run.save(line)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
