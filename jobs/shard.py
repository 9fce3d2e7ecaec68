"""Shard LLaVA's instruction mixture (JSON or JSONL + image folders, local or s3://) into Parquet.

    python jobs/shard.py --recipe tiny [--set paths.root=s3://bucket/run]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import load_recipe, recipe_argparser  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from pipelines.shard import run_shard  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = recipe_argparser(__doc__).parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    init_ray()
    paths = recipe.paths
    manifest = run_shard(paths.mixture, paths.image_root, paths.shards, recipe.shard)
    for reason, count in manifest["per_reject_reason"].items():
        print(f"  set aside: {count} x {reason} (ids in {paths.shards}/rejects.parquet)")
    return manifest


if __name__ == "__main__":
    main()
