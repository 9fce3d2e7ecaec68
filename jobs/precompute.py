"""Precompute the TRIM cache: frozen CLIP towers over the shards, reduced visual tokens to Parquet.

    python jobs/precompute.py --recipe tiny [--set trim.preset=official] [--set paths.root=s3://bucket/run]

Writes a new version of {paths.root}/cache/ when the shards' version, the CLIP checkpoint's files or a
setting that changes the cache differ from every complete version (the same inputs again: nothing to
do); run again to resume a stopped job. The newest precompute.keep_versions versions are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import CacheManifest  # noqa: E402
from pipelines.precompute.stage import log_precompute, run_precompute  # noqa: E402
from pipelines.ray_cluster import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> CacheManifest:
    args = recipe_argparser(__doc__).parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.paths.require("clip")
    init_ray()
    paths = recipe.paths
    manifest = run_precompute(paths.shards, paths.cache, paths.clip, recipe.trim, recipe.precompute)
    return log_precompute(recipe, manifest)  # kept-token statistics and a few pictures to MLflow


if __name__ == "__main__":
    main()
