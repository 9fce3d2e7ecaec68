"""Write the evaluation's annotations.jsonl from a benchmark's own answer file.

    python jobs/annotations.py --recipe llava-1.5-7b --from textvqa --input TextVQA_0.5.1_val.json
    python jobs/annotations.py --recipe llava-1.5-7b --from gqa --input testdev_balanced_questions.json \\
        --set paths.eval_annotations=s3://bucket/run/data/eval/gqa-annotations.jsonl
    python jobs/annotations.py --recipe llava-1.5-7b --from pope --input pope/coco   # coco_pope_*.json there,
        # paired with paths.eval_questions (LLaVA's llava_pope_test.jsonl)

Formats and how their answers are matched and scored: pipelines/evaluate/annotation_formats.py. Writes
paths.eval_annotations (local or s3://) whole, under a temporary name first.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import storage  # noqa: E402
from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.evaluate.annotation_formats import (  # noqa: E402
    FORMATS,
    POPE_PREFIX,
    POPE_SUFFIX,
    convert,
    pope_annotations,
    to_jsonl,
)
from pipelines.evaluate.annotations import iter_question_records  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402

logger = logging.getLogger("jobs.annotations")


def main(argv: list[str] | None = None) -> str:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--from", dest="kind", required=True, choices=FORMATS, help="the benchmark's file format")
    parser.add_argument("--input", required=True, help="the benchmark's answer file, or POPE's folder of label "
                        "files (local or s3://)")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    if args.kind == "pope":
        questions = [record for _, _, record in iter_question_records(
            storage.read_bytes(recipe.paths.eval_questions).decode("utf-8"), recipe.paths.eval_questions)]
        labels = {name: storage.read_bytes(storage.join(args.input, name)).decode("utf-8")
                  for name in storage.listdir(args.input, POPE_SUFFIX) if name.startswith(POPE_PREFIX)}
        if not labels:
            raise SystemExit(f"{args.input}: no {POPE_PREFIX}<category>{POPE_SUFFIX} label files")
        annotations = pope_annotations(questions, labels, args.input)
    else:
        try:
            document = json.loads(storage.read_bytes(args.input))
        except ValueError as e:
            raise SystemExit(f"{args.input}: not JSON ({e})") from e
        annotations = convert(args.kind, document, args.input)
    out = recipe.paths.eval_annotations
    storage.write_bytes(out, to_jsonl(annotations))
    logger.info("%d %s annotations from %s -> %s", len(annotations), args.kind, args.input, out)
    return out


if __name__ == "__main__":
    main()
