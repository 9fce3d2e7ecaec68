"""Efficiency report (TRIM paper Fig. 1 / Table 2): with and without TRIM, for a batch of one.

    python jobs/report.py --recipe tiny [--question-tokens 32] [--visual-trim 122] [--no-low-latency]

Prints the measured tables of the recipe's model on the device at hand (a GPU in bf16 if there is one,
else the CPU in fp32; named in the titles), eager and on the low-latency path (static KV cache, CUDA
graphs on CUDA): CLIP + TRIM time, time to first token, decode time per token; prefill FLOPs and KV
cache computed. Then the analytic (computed) tables of LLaVA-1.5-7B and 13B. Logs them to MLflow (run
<train.run_name>-report): the text, one table artifact per table, metrics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import CacheManifest  # noqa: E402
from pipelines.redaction import redact_uri  # noqa: E402
from pipelines.report import (  # noqa: E402
    PAPER_VISUAL_TOKENS,
    build_report,
    cache_share,
    load_answerer,
    log_report,
    sample_image,
)
from pipelines.tracking import Tracker  # noqa: E402
from pipelines.tracking_store import default_tracking_uri, experiment_name  # noqa: E402
from pipelines.train.runs import resolve_run_name  # noqa: E402
from trim.efficiency import LlmShape  # noqa: E402
from trim.timing import device_name, question_of_length, timed_generation  # noqa: E402

logger = logging.getLogger("jobs.report")


def main(argv: list[str] | None = None):
    parser = recipe_argparser(__doc__)
    parser.add_argument("--question-tokens", type=int, default=32, help="question length in tokens (default 32)")
    parser.add_argument("--visual-trim", type=int, default=PAPER_VISUAL_TOKENS,
                        help="visual tokens with TRIM in the 7B/13B tables (default: the paper's 21%% share, "
                             f"{PAPER_VISUAL_TOKENS}); rows at the share measured in the cache are added beside them")
    parser.add_argument("--system-tokens", type=int, default=0, help="template tokens counted in the 7B/13B tables")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (medians are reported)")
    parser.add_argument("--no-low-latency", action="store_true", help="time the eager path only")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = resolve_run_name(load_recipe(args.recipe, args.overrides))  # {cache_version}: the current cache's run
    paths = recipe.paths

    manifest = CacheManifest.read_if_exists(paths.cache)
    share = cache_share(manifest)
    answerer = load_answerer(recipe)
    device = device_name(answerer.device)
    dtype = next(answerer.model.parameters()).dtype
    logger.info("measuring on %s, %s", device, dtype)
    question = question_of_length(answerer.tokenizer, args.question_tokens)
    image = sample_image(recipe)
    runs = timed_generation(answerer, image, question, new_tokens=args.new_tokens, repeats=args.repeats)
    fast = None if args.no_low_latency else timed_generation(answerer, image, question, new_tokens=args.new_tokens,
                                                             repeats=args.repeats, low_latency=True)
    report = build_report(recipe.name, runs, LlmShape.from_config(answerer.model.llm.config), args.question_tokens,
                          args.visual_trim, args.system_tokens, share, device=device, low_latency_runs=fast,
                          bytes_per_element=dtype.itemsize, graphs=answerer.device.type == "cuda")
    print(report.text, end="")

    tracking_uri = default_tracking_uri(paths.root)
    with Tracker(tracking_uri, experiment_name(recipe.name)) as tracker:
        tracker.start(f"{recipe.train.run_name}-report")
        log_report(tracker, report, {"question_tokens": args.question_tokens, "visual_trim": args.visual_trim,
                                     "cache_visual_tokens": share.visual_tokens if share else None,
                                     "cache_encoder": share.encoder if share else None,
                                     "system_tokens": args.system_tokens, "new_tokens": args.new_tokens,
                                     "repeats": args.repeats, "trim": answerer.trim_cfg.to_dict(),
                                     "device": device, "dtype": str(dtype), "low_latency": fast is not None})
    logger.info("logged to %s (run %s)", redact_uri(tracking_uri), tracker.run_id)
    return report


if __name__ == "__main__":
    main()
