"""Shard LLaVA's instruction mixture (JSON or JSONL + image folders, local or s3://) into Parquet.

    python jobs/shard.py --recipe tiny [--set paths.root=s3://bucket/run]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import ShardsManifest  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from pipelines.shard import run_shard  # noqa: E402

logger = logging.getLogger("jobs.shard")


def main(argv: list[str] | None = None) -> ShardsManifest:
    args = recipe_argparser(__doc__).parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    init_ray()
    paths = recipe.paths
    manifest = run_shard(paths.mixture, paths.image_root, paths.shards, recipe.shard)
    for reason, count in manifest.per_reject_reason.items():
        logger.info("set aside: %d x %s (ids in %s/rejects.parquet)", count, reason, paths.shards)
    return manifest


if __name__ == "__main__":
    main()
