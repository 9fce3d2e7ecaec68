"""Fine-tune projector + LLM on the TRIM cache with Ray Train + DeepSpeed, tracked in MLflow.

    ray job submit --working-dir . -- python jobs/finetune.py --recipe tiny
    python jobs/finetune.py --recipe llava-1.5-7b --set paths.root=s3://bucket/run --set train.num_workers=8

The same train.run_name resumes from its latest checkpoint (step, data position and MLflow run); on
another cache, recipe or number of workers it is refused unless train.start_fresh. A name holding
{cache_version} follows the cache (pipelines/train/runs.py): the scheduled retraining passes
train.run_name=<name>-{cache_version}, so new data starts a new run and a rerun resumes or skips it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.ray_cluster import init_ray, node_count  # noqa: E402
from pipelines.redaction import redact_uri  # noqa: E402
from pipelines.tracking import Tracker  # noqa: E402
from pipelines.tracking_store import (  # noqa: E402
    check_store_reachable,
    default_tracking_uri,
    experiment_name,
)
from pipelines.train.runs import finetune, prepare_run  # noqa: E402

logger = logging.getLogger("jobs.finetune")


def main(argv: list[str] | None = None) -> dict:
    args = recipe_argparser(__doc__).parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.paths.require("llm")
    # Locally, leave CPUs beside the workers for the data pipeline (Ray CPUs are logical).
    init_ray(num_cpus=max(os.cpu_count() or 1, recipe.train.num_workers + 2))
    tracking_uri = default_tracking_uri(recipe.paths.root)
    check_store_reachable(tracking_uri, node_count())  # a sqlite file on one node cannot serve rank 0 elsewhere
    run_name = recipe.train.run_name
    try:
        run = prepare_run(recipe, tracking_uri)
        run_name = run.name  # the MLflow run's name, should the job fail
        outcome = finetune(run)
        run_name, error = outcome.run_name, outcome.error
    except Exception as exc:
        error, outcome = exc, None
    if error is not None:  # runs whose worker was killed were left RUNNING
        Tracker(tracking_uri, experiment_name(recipe.name)).fail_unfinished(run_name)
        raise SystemExit(f"finetune failed: {error}")
    assert outcome is not None
    metrics = outcome.metrics
    if not outcome.already_complete:
        logger.info("loss %.4f -> %.4f over %s steps; model in %s", metrics.get("first_loss", float("nan")),
                    metrics.get("loss", float("nan")), metrics.get("step"), outcome.model_dir)
    shown = redact_uri(tracking_uri)
    logger.info("runs tracked at %s; look with: mlflow ui --backend-store-uri %s", shown, shown)
    return metrics


if __name__ == "__main__":
    main()
