"""The embedded default, end to end on one CPU machine: `make demo`.

Builds the tiny models, writes a synthetic LLaVA mixture, and runs TRIM on its images and questions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import load_recipe, recipe_argparser  # noqa: E402
from pipelines.synthetic import write_mixture  # noqa: E402
from trim import trim_tokens  # noqa: E402
from trim.conversation import trim_text  # noqa: E402
from trim.encoders import ClipEncoder  # noqa: E402
from trim.tiny import build_tiny_models  # noqa: E402


def main() -> None:
    args = recipe_argparser(__doc__).parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    root = Path(recipe.paths.root)
    models = build_tiny_models(root / "models")
    mixture = write_mixture(root / "data", recipe.synth.num_samples, recipe.synth.num_images, recipe.synth.seed)
    records = [r for r in json.loads(mixture.read_text()) if "image" in r][:8]
    encoder = ClipEncoder(models.clip)
    from PIL import Image

    images = [Image.open(root / "data" / "images" / r["image"]) for r in records]
    texts = [trim_text(r["conversations"], recipe.trim.text) for r in records]
    out = trim_tokens(*vars(encoder.encode_images(images)).values(), encoder.encode_texts(texts), recipe.trim)
    for record, kept in zip(records, out.num_kept.tolist()):
        print(f"{record['id']:>24}: kept {kept}/{encoder.num_patches} patches (+1 aggregate)")


if __name__ == "__main__":
    main()
