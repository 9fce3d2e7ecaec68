"""Evaluate a fine-tuned model: online CLIP + TRIM + greedy answers over a LLaVA question file, scored.

    python jobs/evaluate.py --recipe tiny
    python jobs/evaluate.py --recipe llava-1.5-7b --set paths.root=s3://bucket/run --trim full

The model is paths.checkpoints/<train.run_name>/model (written by jobs/finetune.py). Each model and
TRIM setting gets its own folder, {paths.root}/eval/<run>-<trim>-<hash12>/ (the hash covers the model's
files, the TRIM config, the questions, the images and the generation settings): answers.jsonl in
LLaVA's format, set-aside questions in rejects.jsonl, manifest.json written last. The same inputs
again reuse that folder's answers; metrics, the answers and a few TRIM pictures go to MLflow (run
<train.run_name>-eval).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import storage  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.evaluate.stage import run_evaluate  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import EvalManifest  # noqa: E402
from pipelines.runtime import init_ray, redact_uri  # noqa: E402
from pipelines.tracking_store import default_tracking_uri  # noqa: E402
from pipelines.train.runs import resolve_run_name  # noqa: E402
from trim.model_files import SETTINGS_FILE  # noqa: E402

logger = logging.getLogger("jobs.evaluate")


def main(argv: list[str] | None = None) -> EvalManifest:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--trim", default="model", metavar="SPEC",
                        help="TRIM at inference: model (as trained; default), recipe, full (no reduction), "
                             "or a preset: default, paper, official, ratio:<float>")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = resolve_run_name(load_recipe(args.recipe, args.overrides))  # {cache_version}: the current cache's run
    recipe.paths.require("clip", "eval_questions", "eval_images")
    model_dir = recipe.paths.model_dir(recipe.train.run_name)
    if not storage.exists(storage.join(model_dir, SETTINGS_FILE)):
        raise SystemExit(f"evaluate: no model at {model_dir}; run jobs/finetune.py first")
    init_ray()
    tracking_uri = default_tracking_uri(recipe.paths.root)
    manifest = run_evaluate(recipe, model_dir, args.trim, tracking_uri)
    logger.info(", ".join(f"{k} {v:.4g}" for k, v in manifest.metrics.items()))
    logger.info("answers in %s", manifest.answers)
    logger.info("runs tracked at %s", redact_uri(tracking_uri))
    return manifest


if __name__ == "__main__":
    main()
