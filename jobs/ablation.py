"""The paper's ablation in miniature: fine-tune the tiny LLaVA on synthetic scenes once per reduction
(all 576 tokens, TRIM, TRIM without the aggregate, uniform pooling and random patches at TRIM's count,
TRIM with the other sign) and score each on held-out scenes.

    python jobs/ablation.py --recipe tiny [--quick] [--steps N] [--set trim.keep=most_similar]

Writes <root>/ablation/table.md and results.json, logs one MLflow run per row (experiment
"<recipe>-ablation"), and ends with one `RESULT {json}` line. --quick: a few steps on a few scenes,
to check that it runs end to end (CI), not to measure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.tracking import Tracker, flatten  # noqa: E402
from pipelines.tracking_store import default_tracking_uri  # noqa: E402
from studies.ablation import AblationConfig, chance, encode, make_split, run_row, variants  # noqa: E402
from synthetic.tiny_models import build_tiny_llm, shipped_clip  # noqa: E402
from trim.encoders import ClipEncoder  # noqa: E402

logger = logging.getLogger("jobs.ablation")
QUICK = AblationConfig(train_scenes=48, eval_scenes=24, steps=6, batch_size=8, llm_hidden=32, llm_depth=1)


def table(rows: list[dict], chance_level: float) -> str:
    lines = ["| row | accuracy | colour | position | count | mean visual tokens | train step (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['accuracy']:.3f} | {r['accuracy_colour']:.3f} | {r['accuracy_position']:.3f} "
                     f"| {r['accuracy_count']:.3f} | {r['mean_visual_tokens']:.1f} | {r['step_seconds']:.3f} |")
    lines.append(f"| chance (most common answer per kind) | {chance_level:.3f} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few scenes (CI)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per row (default: the config's)")
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    parser.add_argument("--scenes", type=int, default=0, help="training scenes (default: the config's)")
    parser.add_argument("--clip", default="", help="CLIP checkpoint (default: the shipped models/tiny-clip)")
    args = parser.parse_args(argv)
    setup_logging()
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = QUICK if args.quick else AblationConfig()
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.scenes:
        cfg = dataclasses.replace(cfg, train_scenes=args.scenes)
    out = Path(recipe.paths.root) / ("ablation-quick" if args.quick else "ablation")
    out.mkdir(parents=True, exist_ok=True)
    llm = build_tiny_llm(out / "llm", hidden=cfg.llm_hidden, depth=cfg.llm_depth, seed=cfg.seed)
    encoder = ClipEncoder(args.clip or shipped_clip())
    train_scenes, train_samples = make_split(cfg.train_scenes, seed=cfg.seed)
    eval_scenes, eval_samples = make_split(cfg.eval_scenes, seed=cfg.seed + 10_000)
    train = (encode(encoder, train_scenes, train_samples), train_samples)
    held_out = (encode(encoder, eval_scenes, eval_samples), eval_samples)
    tracking_uri = default_tracking_uri(recipe.paths.root)
    rows = []
    chosen = variants(recipe.trim)
    if args.rows:
        chosen = {name: chosen[name] for name in args.rows.split(",")}
    for name, trim_cfg in chosen.items():
        with Tracker(tracking_uri, f"{recipe.name}-ablation") as tracker:
            tracker.start(f"{name}{'-quick' if args.quick else ''}")
            tracker.log_params(flatten({"ablation": dataclasses.asdict(cfg), "trim": trim_cfg.to_dict()}))
            row = run_row(name, trim_cfg, train, held_out, llm, cfg)
            tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=cfg.steps)
        logger.info("%s: accuracy %.3f with %.1f visual tokens", name, row["accuracy"], row["mean_visual_tokens"])
        rows.append(row)
    chance_level = chance(eval_samples)
    (out / "table.md").write_text(table(rows, chance_level) + "\n")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows,
                                                  "chance": chance_level}, indent=1))
    result = {f"accuracy_{r['row']}": round(r["accuracy"], 4) for r in rows}
    result.update({f"mean_visual_tokens_{r['row']}": round(r["mean_visual_tokens"], 2) for r in rows})
    result.update(chance=round(chance_level, 4), trim_keep=recipe.trim.keep, steps=cfg.steps,
                  table=str(out / "table.md"))
    print(table(rows, chance_level))
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
