"""Shard LLaVA's instruction mixture (JSON or JSONL + image folders, local or s3://) into Parquet.

    python jobs/shard.py --recipe tiny [--set paths.root=s3://bucket/run]

Writes a new version of {paths.root}/shards/ when the mixture, its images or the shard settings
changed (nothing when they did not). A mixture that cannot be read as a whole (not a regular file,
not JSON, empty...) is refused before any work: one line naming the file, exit status 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import storage  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import ShardsManifest  # noqa: E402
from pipelines.ray_cluster import init_ray  # noqa: E402
from pipelines.shard.mixture import MixtureError  # noqa: E402
from pipelines.shard.stage import run_shard  # noqa: E402

REFUSALS = (MixtureError, FileNotFoundError, IsADirectoryError, PermissionError)
"""Whole-input problems the job reports as one line, not a traceback (their messages name the file)."""

logger = logging.getLogger("jobs.shard")


def main(argv: list[str] | None = None) -> ShardsManifest:
    args = recipe_argparser(__doc__).parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    init_ray()
    paths = recipe.paths
    try:
        manifest = run_shard(paths.mixture, paths.image_root, paths.shards, recipe.shard)
    except REFUSALS as err:
        # Raised in a Ray worker, it arrives wrapped (its class is also a RayTaskError): the cause's
        # message names the file; the traceback would only bury it.
        message = str(getattr(err, "cause", None) or err)
        logger.error("shard refused the input: %s", message)
        raise SystemExit(1) from None
    rejects = storage.join(paths.shards, manifest.version, "rejects.parquet")
    for reason, count in manifest.per_reject_reason.items():
        logger.info("set aside: %d x %s (ids in %s)", count, reason, rejects)
    return manifest


if __name__ == "__main__":
    main()
