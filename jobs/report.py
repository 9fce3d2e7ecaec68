"""Efficiency report (TRIM paper Fig. 1 / Table 2): with and without TRIM, for a batch of one.

    python jobs/report.py --recipe tiny [--question-tokens 32] [--visual-trim 122]

Prints the measured table of the recipe's model (CLIP + TRIM time, time to first token, decode time
per token; prefill FLOPs and KV cache computed) and the analytic tables of LLaVA-1.5-7B and 13B, and
logs them to MLflow (run <train.run_name>-report): the text, one table artifact per model, metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import storage  # noqa: E402
from pipelines.config import load_recipe, recipe_argparser  # noqa: E402
from pipelines.report import build_report, default_visual_trim, load_engine, log_report, sample_image  # noqa: E402
from pipelines.tracking import Tracker, default_tracking_uri  # noqa: E402
from trim.efficiency import LlmShape  # noqa: E402
from trim.inference import question_of_length, timed_generation  # noqa: E402


def main(argv: list[str] | None = None):
    parser = recipe_argparser(__doc__)
    parser.add_argument("--question-tokens", type=int, default=32, help="question length in tokens (default 32)")
    parser.add_argument("--visual-trim", type=int, default=None,
                        help="visual tokens with TRIM in the 7B/13B tables (default: the cache's mean tokens per "
                             "image if a cache exists, else round(0.21 * 576) + 1)")
    parser.add_argument("--system-tokens", type=int, default=0, help="template tokens counted in the 7B/13B tables")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (medians are reported)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    paths = recipe.paths

    manifest_uri = storage.join(paths.cache, "manifest.json")
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    visual_trim = args.visual_trim if args.visual_trim is not None else default_visual_trim(manifest)
    engine = load_engine(recipe)
    question = question_of_length(engine.tokenizer, args.question_tokens)
    runs = timed_generation(engine, sample_image(recipe), question, new_tokens=args.new_tokens, repeats=args.repeats)
    report = build_report(recipe.name, runs, LlmShape.from_config(engine.model.llm.config), args.question_tokens,
                          visual_trim, args.system_tokens)
    print(report.text, end="")

    tracking_uri = default_tracking_uri(paths.root)
    tracker = Tracker(tracking_uri, f"trim-llava-{recipe.name}")
    tracker.start(f"{recipe.train.run_name}-report")
    log_report(tracker, report, {"question_tokens": args.question_tokens, "visual_trim": visual_trim,
                                 "visual_trim_source": "argument" if args.visual_trim is not None
                                 else ("cache" if manifest else "paper share 0.21"),
                                 "system_tokens": args.system_tokens, "new_tokens": args.new_tokens,
                                 "repeats": args.repeats, "trim": engine.trim_cfg.to_dict()})
    tracker.end()
    print(f"report: logged to {tracking_uri} (run {tracker.run_id})")
    return report


if __name__ == "__main__":
    main()
