"""The embedded default, end to end on one CPU machine (`make demo`):

tiny models -> synthetic LLaVA mixture -> shard -> precompute (TRIM cache) -> fine-tune (2 Ray
workers, DeepSpeed ZeRO-2, CPU) -> evaluate -> efficiency report, all tracked in MLflow.

    python jobs/demo.py [--set paths.root=runs/tiny] [--set train.epochs=1]

Each stage is the real job (the same code `ray job submit -- python jobs/<stage>.py` runs); a rerun
skips or resumes what is done.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import evaluate, finetune, precompute, report, shard  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.ray_cluster import init_ray  # noqa: E402
from synthetic.mixture import write_eval_split, write_mixture  # noqa: E402
from synthetic.tiny_models import build_tiny_models  # noqa: E402

logger = logging.getLogger("jobs.demo")


def banner(text: str) -> None:
    logger.info("=== %s ===", text)


def main() -> None:
    args = recipe_argparser(__doc__).parse_args()
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    argv = ["--recipe", args.recipe] + [a for o in args.overrides for a in ("--set", o)]
    root = Path(recipe.paths.root)

    banner("tiny models and a synthetic LLaVA-1.5 mixture")
    build_tiny_models(Path(recipe.paths.clip).parent)
    mixture = write_mixture(root / "data", recipe.synth.num_samples, recipe.synth.num_images, recipe.synth.seed)
    write_eval_split(Path(recipe.paths.eval_questions).parent, recipe.synth.num_eval_questions)
    logger.info("mixture: %s", mixture)
    init_ray(num_cpus=max(os.cpu_count() or 1, recipe.train.num_workers + 2))

    banner("shard")
    shard.main(argv)
    banner("precompute the TRIM cache")
    cache = precompute.main(argv)
    kept = cache.kept
    logger.info("tokens kept per image: mean %.1f, median %.0f, range %d-%d of %d (%.1f%%), plus 1 aggregate token",
                kept.mean, kept.median, kept.min, kept.max, cache.encoder["num_patches"], 100 * kept.mean_share)
    banner("fine-tune (Ray Train + DeepSpeed)")
    finetune.main(argv)
    banner("evaluate")
    evaluate.main(argv)
    banner("efficiency report")
    report.main(argv)
    logger.info("Done. Browse the runs: mlflow ui --backend-store-uri sqlite:///%s/mlflow.db", root.resolve())


if __name__ == "__main__":
    main()
