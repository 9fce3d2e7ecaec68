"""TRIM pictures (paper Fig. 2): each image with its kept patches outlined beside the patch scores.

    python jobs/pictures.py --recipe tiny --samples vqav2-0000003 gqa-0000001
    python jobs/pictures.py --recipe tiny --questions 0 1 2 [--out pictures/] [--from-cache]

Shard samples are scored against their training text (trim.text), evaluation questions against the
question (trim.text_at_inference), online with the CLIP towers and the recipe's TRIM config;
--from-cache draws samples from what the TRIM cache holds instead. With no ids: the first
eval.num_pictures evaluation questions. Prints the paths written.
"""

from __future__ import annotations

import io
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from pipelines import storage  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.evaluate.questions import parse_questions, question_key  # noqa: E402
from pipelines.evaluate.stage import picture_stem  # noqa: E402
from pipelines.images import ImageStore, read_image  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.manifests import MANIFEST_FILE, CacheManifest, resolve_output  # noqa: E402
from pipelines.pictures import cache_pictures, default_out_dir, online_pictures  # noqa: E402

logger = logging.getLogger("jobs.pictures")


def cache_shards(cache: str, shards_root: str) -> str:
    """The shards version the cache version `cache` was made from (it holds the images of the cache's
    samples), or the current one where retention removed it (images are stored by content hash, so
    those the mixture still uses are found there)."""
    version = CacheManifest.read(cache).identity.get("shards", {}).get("version")
    folder = storage.join(shards_root, version) if version else ""
    return folder if folder and storage.exists(storage.join(folder, MANIFEST_FILE)) else resolve_output(shards_root)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--samples", nargs="*", default=[], metavar="ID", help="sample ids of the shards")
    parser.add_argument("--questions", nargs="*", default=[], metavar="QID", help="evaluation question ids")
    parser.add_argument("--out", default=None, help="output folder (default {paths.root}/pictures)")
    parser.add_argument("--from-cache", action="store_true", help="draw samples from the TRIM cache")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    paths, cfg = recipe.paths, recipe.trim
    out = Path(args.out or default_out_dir(paths.root))

    if args.samples and args.from_cache:
        cache = resolve_output(paths.cache)
        written = cache_pictures(cache_shards(cache, paths.shards), cache, out, ids=args.samples)
    else:
        from pipelines.precompute.stage import load_samples
        from trim.encoders import ClipEncoder
        from trim.questions import inference_text

        items = []
        if args.samples:
            wanted = set(args.samples)
            shards = resolve_output(paths.shards)  # once: samples and images from the same version
            samples = [s for s in load_samples(shards, cfg) if s["id"] in wanted and s["image_key"]]
            images = ImageStore(shards)
            items += [(f"sample-{s['index']:07d}-{s['id']}", Image.open(io.BytesIO(images.get(s["image_key"]))),
                       s["text"]) for s in samples]
        if args.questions or not args.samples:
            questions, _ = parse_questions(storage.read_bytes(paths.eval_questions), paths.eval_questions)
            questions.sort(key=lambda q: question_key(q["question_id"]))
            wanted = set(args.questions)
            chosen = [q for q in questions if str(q["question_id"]) in wanted] if wanted \
                else questions[:recipe.eval.num_pictures]
        else:
            chosen = []
        shared = Counter(str(q["question_id"]) for q in questions)  # an id several questions share: by line
        items += [(picture_stem(q, shared), read_image(paths.eval_images, q["image"]),
                   inference_text(q["text"], cfg.text_at_inference)) for q in chosen]
        written = online_pictures(ClipEncoder(paths.clip), items, cfg, out) if items else []
    found = len(written)
    asked = len(args.samples) + len(args.questions)
    if asked and found < asked:
        logger.warning("%d of the %d ids were not found (or have no image)", asked - found, asked)
    for path in written:
        logger.info("wrote %s", path)
    return written


if __name__ == "__main__":
    main()
