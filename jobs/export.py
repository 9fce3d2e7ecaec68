"""Export a fine-tuned model directory to LLaVA's layout or to transformers' LlavaForConditionalGeneration.

    python jobs/export.py --format hf --out exports/llava-tiny-hf                  # the recipe's trained model
    python jobs/export.py --model DIR --format llava --out exports/llava-v1.5-7b-trim \\
        --clip openai/clip-vit-large-patch14-336
    python jobs/export.py --model DIR --format hf --out DIR2 [--clip /models/clip-vit-large-patch14-336]

--model defaults to the model the recipe's fine-tuning run wrote (<paths.root>/checkpoints/<run>/model,
local or S3). "hf" bundles the CLIP vision tower (the one the model records, or --clip) and a processor
that pads images like LLaVA; "llava" records --clip (or the recorded CLIP path) as mm_vision_tower.
An engine serving either export feeds all 576 visual tokens per image: TRIM runs only in this project's
inference (trim.inference.Answerer). The export is written beside --out and takes its place once
complete, so a failed or killed export leaves the previous one there.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import storage  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.train.runs import resolve_run_name  # noqa: E402
from trim.formats import export_model  # noqa: E402

logger = logging.getLogger("jobs.export")


def main(argv: list[str] | None = None) -> Path:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--model", default="", help="model directory written by fine-tuning (local or s3://); "
                        "default: the recipe's <paths.root>/checkpoints/<train.run_name>/model")
    parser.add_argument("--format", required=True, choices=("llava", "hf"),
                        help="llava: haotian-liu/LLaVA's layout; hf: transformers' LlavaForConditionalGeneration")
    parser.add_argument("--out", required=True, help="directory to write (local)")
    parser.add_argument("--clip", default=None, help="CLIP checkpoint to bundle (hf) or name to record (llava); "
                        "default: the encoder path the model directory records")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (the new export is "
                        "written beside it and takes its place once complete)")
    args = parser.parse_args(argv)
    setup_logging()
    model = args.model
    if not model:
        recipe = resolve_run_name(load_recipe(args.recipe, args.overrides))  # {cache_version}: the current cache's run
        model = recipe.paths.model_dir(recipe.train.run_name)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} exists and is not empty; pass --overwrite to replace it")
    local = storage.local_copy(model)
    try:
        written = export_model(local, out, args.format, clip=args.clip)
    finally:
        if local != model:
            shutil.rmtree(local, ignore_errors=True)
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    logger.info("%s export of %s in %s:\n  %s", args.format, model, written, "\n  ".join(map(str, files)))
    return written


if __name__ == "__main__":
    main()
