"""The ablation across model seeds: each row trained and scored once per seed, reported as the seeds'
mean and standard deviation, overall and per question kind.

One seed's figure of a row moves by several points from seed to seed (a fresh initialisation and
batch order on the same scenes), so a difference between rows means something only beyond that
spread. Each (row, seed) is written to its own file as it finishes, keyed by everything it depends on,
and the encoded scenes are kept likewise, so a stopped run resumes where it was and a changed config
never reuses an old figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from studies.ablation import KINDS, AblationConfig, Encoded, RowData, Sample, encode, run_seed
from synthetic.scenes import Scene
from trim.encoders import ClipEncoder

logger = logging.getLogger(__name__)

FIGURES = ("accuracy", *(f"accuracy_{k}" for k in KINDS))
"""The per-seed figures summarised per row (overall, then per question kind)."""


def model_seeds(cfg: AblationConfig) -> list[int]:
    """The model seeds of a run: cfg.seed, cfg.seed + 1, ... (cfg.seeds of them)."""
    if cfg.seeds < 1:
        raise ValueError(f"AblationConfig.seeds must be at least 1, got {cfg.seeds}")
    return [cfg.seed + i for i in range(cfg.seeds)]


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation of a single value is 0."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(name: str, per_seed: Sequence[dict]) -> dict:
    """One row's seeds as {accuracy, accuracy_std, accuracy_<kind>, accuracy_<kind>_std, ...}, with the
    per-seed figures under "per_seed"."""
    if not per_seed:
        raise ValueError(f"row {name}: no seeds to summarise")
    row: dict = {"row": name, "seeds": [r["seed"] for r in per_seed]}
    for figure in FIGURES:
        row[figure], row[f"{figure}_std"] = spread([r[figure] for r in per_seed])
    row["mean_visual_tokens"] = statistics.fmean(r["mean_visual_tokens"] for r in per_seed)
    row["step_seconds"] = statistics.fmean(r["step_seconds"] for r in per_seed)
    row["per_seed"] = list(per_seed)
    return row


def record_key(cfg: AblationConfig, row: RowData, seed: int, clip: str) -> str:
    """What a (row, seed) figure depends on: the config (but the seed count), the row's reduction,
    the model seed, the CLIP checkpoint's hash and the learning-rate schedule (transformers' cosine
    with warmup)."""
    ablation = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "seeds"}
    text = json.dumps({"ablation": ablation, "trim": row.trim.to_dict(), "seed": seed, "clip": clip,
                       "schedule": "transformers-cosine-with-warmup"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(records: Path, row: str, seed: int, key: str) -> Path:
    """Where a finished (row, seed) is kept: named by its key too, so runs of other settings (say 1000
    steps beside 300) keep their own records side by side instead of replacing each other's."""
    return records / f"{row}-seed{seed}-{key}.json"


def _saved(path: Path, unkeyed: Path) -> tuple[Path, dict]:
    """The record at `path`, else one written under the name without a key (before record_path), else {};
    with the file it came from."""
    for candidate in (path, unkeyed):
        if candidate.exists():
            return candidate, json.loads(candidate.read_text())
    return path, {}


def run_rows(rows: Sequence[RowData], cfg: AblationConfig, llm_for_seed: Callable[[int], Path], records: Path,
             clip: str) -> list[dict]:
    """Every row under every seed, seed by seed (a run stopped early has every row at its first seeds),
    each (row, seed) read back from `records` when a finished one with the same key is there; one
    summary per row."""
    records.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, list[dict]] = {row.name: [] for row in rows}
    for seed in model_seeds(cfg):
        for row in rows:
            key = record_key(cfg, row, seed, clip)
            path = record_path(records, row.name, seed, key)
            found, saved = _saved(path, records / f"{row.name}-seed{seed}.json")
            if saved.get("key") == key:
                logger.info("%s seed %d: done before (%s)", row.name, seed, found)
                result = saved["result"]
            else:
                result = run_seed(row, llm_for_seed(seed), cfg, seed)
                staged = path.with_suffix(".partial")
                staged.write_text(json.dumps({"key": key, "result": result}, indent=1))
                staged.replace(path)  # a stopped write never leaves a half file under the final name
            logger.info("%s seed %d: accuracy %.3f (colour %.3f, position %.3f, count %.3f)", row.name, seed,
                        result["accuracy"], result["accuracy_colour"], result["accuracy_position"],
                        result["accuracy_count"])
            per_seed[row.name].append(result)
    return [summarise(row.name, per_seed[row.name]) for row in rows]


def encode_cached(encoder: ClipEncoder, clip: str, scenes: Sequence[Scene], samples: Sequence[Sample],
                  cache: Path) -> Encoded:
    """`encode`, kept on disk under a key of the CLIP checkpoint's hash and the split, so another run on
    the same scenes (more seeds, a resumed run) does not render and encode them again."""
    text = json.dumps({"clip": clip, "scenes": [dataclasses.asdict(s) for s in scenes],
                       "questions": [s.question for s in samples]}, sort_keys=True)
    path = cache / f"encoded-{len(scenes)}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        logger.info("encoded scenes read back from %s", path)
        return Encoded(**torch.load(path))
    encoded = encode(encoder, scenes, samples)
    cache.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".partial")
    torch.save(dataclasses.asdict(encoded), staged)
    staged.replace(path)
    return encoded


def table(rows: Sequence[dict], chance_level: float) -> str:
    """Markdown: each figure as mean ± standard deviation over the row's seeds."""
    lines = ["| row | accuracy | colour | position | count | mean visual tokens | train step (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[f]:.3f} ± {r[f + '_std']:.3f}" for f in FIGURES)
        lines.append(f"| {r['row']} | {cells} | {r['mean_visual_tokens']:.1f} | {r['step_seconds']:.3f} |")
    lines.append(f"| chance (most common answer per kind) | {chance_level:.3f} | | | | | |")
    return "\n".join(lines)


def result_figures(rows: Sequence[dict], cfg: AblationConfig) -> dict:
    """The RESULT line's figures: accuracy_<row> (the seeds' mean), accuracy_<row>_std, the mean visual
    tokens per row, and `seeds` (how many)."""
    result: dict = {}
    for r in rows:
        result[f"accuracy_{r['row']}"] = round(r["accuracy"], 4)
        result[f"accuracy_{r['row']}_std"] = round(r["accuracy_std"], 4)
    result.update({f"mean_visual_tokens_{r['row']}": round(r["mean_visual_tokens"], 2) for r in rows})
    result["seeds"] = cfg.seeds
    return result
