"""The paper's ablation in miniature: fine-tune the tiny LLaVA on synthetic scenes once per reduction
(all 576 tokens, TRIM, TRIM without the aggregate, uniform pooling and random patches at TRIM's count,
TRIM with the other sign) and model seed, and score each on held-out scenes.

    python jobs/ablation.py --recipe tiny [--seeds N] [--quick] [--steps N] [--rows full,trim]

Writes <root>/ablation/table.md (each row's mean ± standard deviation over its seeds) and results.json
(with every seed's figures and loss curve), logs one MLflow run per row (experiment
"<recipe>-ablation"), and ends with one `RESULT {json}` line. A stopped run resumes: each finished
(row, seed) is kept under <root>/ablation/seeds/. --quick: a few steps on a few scenes, to check that it
runs end to end (CI), not to measure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import recipe_argparser  # noqa: E402
from pipelines.config import load_recipe  # noqa: E402
from pipelines.logs import setup_logging  # noqa: E402
from pipelines.tracking import Tracker, flatten  # noqa: E402
from pipelines.tracking_store import default_tracking_uri  # noqa: E402
from studies.ablation import AblationConfig, chance, make_split, prepare_row, variants  # noqa: E402
from studies.ablation_seeds import encode_cached, result_figures, run_rows, table  # noqa: E402
from synthetic.tiny_models import build_tiny_llm, shipped_clip  # noqa: E402
from trim.encoders import ClipEncoder, checkpoint_hash  # noqa: E402
from trim.llm_tokenizer import load_llm_tokenizer  # noqa: E402

logger = logging.getLogger("jobs.ablation")
QUICK = AblationConfig(train_scenes=48, eval_scenes=24, steps=6, batch_size=8, llm_hidden=32, llm_depth=1)


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_argparser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few scenes (CI)")
    parser.add_argument("--seeds", type=int, default=0, help="model seeds per row (default: the config's)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per row (default: the config's)")
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    parser.add_argument("--scenes", type=int, default=0, help="training scenes (default: the config's)")
    parser.add_argument("--eval-scenes", type=int, default=0, help="held-out scenes (default: the config's)")
    parser.add_argument("--clip", default="", help="CLIP checkpoint (default: the shipped models/tiny-clip)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's; 1 on a crowded machine)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, args.overrides)
    given = {"seeds": args.seeds, "steps": args.steps, "train_scenes": args.scenes, "eval_scenes": args.eval_scenes}
    cfg = dataclasses.replace(QUICK if args.quick else AblationConfig(), **{k: v for k, v in given.items() if v})
    out = Path(recipe.paths.root) / ("ablation-quick" if args.quick else "ablation")
    out.mkdir(parents=True, exist_ok=True)
    clip = args.clip or str(shipped_clip())

    @functools.cache
    def llm_for_seed(seed: int) -> Path:
        return build_tiny_llm(out / f"llm-seed{seed}", hidden=cfg.llm_hidden, depth=cfg.llm_depth, seed=seed)

    encoder = ClipEncoder(clip)
    train_scenes, train_samples = make_split(cfg.train_scenes, seed=cfg.seed)
    eval_scenes, eval_samples = make_split(cfg.eval_scenes, seed=cfg.seed + 10_000)
    clip_hash = checkpoint_hash(clip)
    train = (encode_cached(encoder, clip_hash, train_scenes, train_samples, out / "cache"), train_samples)
    held_out = (encode_cached(encoder, clip_hash, eval_scenes, eval_samples, out / "cache"), eval_samples)
    tokenizer = load_llm_tokenizer(llm_for_seed(cfg.seed))
    tracking_uri = default_tracking_uri(recipe.paths.root)
    chosen = variants(recipe.trim)
    if args.rows:
        unknown = set(args.rows.split(",")) - set(chosen)
        if unknown:
            parser.error(f"--rows: unknown rows {sorted(unknown)} (rows: {', '.join(chosen)})")
        chosen = {name: chosen[name] for name in args.rows.split(",")}
    prepared = [prepare_row(name, trim_cfg, train, held_out, tokenizer) for name, trim_cfg in chosen.items()]
    rows = run_rows(prepared, cfg, llm_for_seed, out / "seeds", clip_hash)
    for row, row_data in zip(rows, prepared):
        with Tracker(tracking_uri, f"{recipe.name}-ablation") as tracker:
            tracker.start(f"{row['row']}{'-quick' if args.quick else ''}")
            tracker.log_params(flatten({"ablation": dataclasses.asdict(cfg), "trim": row_data.trim.to_dict()}))
            tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float)}, step=cfg.steps)
        logger.info("%s: accuracy %.3f ± %.3f over %d seeds with %.1f visual tokens", row["row"], row["accuracy"],
                    row["accuracy_std"], cfg.seeds, row["mean_visual_tokens"])
    chance_level = chance(eval_samples)
    seconds = time.perf_counter() - started
    (out / "table.md").write_text(table(rows, chance_level) + "\n")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "clip": clip, "rows": rows,
                                                  "chance": chance_level, "wall_seconds": seconds}, indent=1))
    result = result_figures(rows, cfg)
    result.update(chance=round(chance_level, 4), trim_keep=recipe.trim.keep, steps=cfg.steps,
                  wall_seconds=round(seconds), table=str(out / "table.md"))
    print(table(rows, chance_level))
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
