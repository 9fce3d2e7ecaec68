"""Recipes: one typed config for every stage, read from recipes/<name>.toml plus `--set` overrides.

A recipe names where things live (`paths`), how TRIM runs (`trim`) and how each stage runs (its
section, pipelines/stage_configs.py). String
paths may hold `{root}`, replaced by `paths.root`, so one override moves a whole run (e.g. to S3).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.stage_configs import EvalConfig, PrecomputeConfig, ShardConfig, SynthConfig, TrainConfig
from trim import TrimConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class PathsConfig:
    """Where each stage reads and writes. Local paths or s3:// URIs."""

    root: str = "runs/tiny"
    """Storage root: shards/, cache/, checkpoints/, eval/ and mlruns/ live beneath it."""
    mixture: str = "{root}/data/llava_v1_5_mix665k.json"
    """The instruction mixture: a JSON array as LLaVA ships it, or JSONL."""
    image_root: str = "{root}/data/images"
    """The folder that holds coco/, gqa/, ocr_vqa/, textvqa/, vg/."""
    clip: str = "{root}/models/clip"
    """CLIP checkpoint directory (vision + text towers with projections)."""
    llm: str = "{root}/models/llm"
    """The starting checkpoint: a causal LM (e.g. vicuna-7b-v1.5, with `projector`), a LLaVA-1.5
    checkpoint as LLaVA saves it, a LlavaForConditionalGeneration checkpoint, or a model directory
    this project exported (trim/formats/__init__.py tells them apart)."""
    projector: str = ""
    """Pretrained projector weights to start from (LLaVA stage-1 mm_projector.bin); "" = random init."""
    eval_questions: str = "{root}/data/eval/questions.jsonl"
    """LLaVA evaluation question file (JSONL: question_id, image, text, category?)."""
    eval_images: str = "{root}/data/eval/images"
    """Image folder of the evaluation questions."""
    eval_annotations: str = "{root}/data/eval/annotations.jsonl"
    """Annotations for scoring (JSONL: question_id, answers | answer, kind?, text? (the question, where
    questions share an id)); optional."""

    @property
    def shards(self) -> str:
        return f"{self.root}/shards"

    @property
    def cache(self) -> str:
        return f"{self.root}/cache"

    @property
    def checkpoints(self) -> str:
        return f"{self.root}/checkpoints"

    @property
    def eval_dir(self) -> str:
        return f"{self.root}/eval"

    def run_dir(self, run_name: str) -> str:
        """A fine-tuning run's checkpoints (Ray Train's run folder)."""
        return f"{self.checkpoints}/{run_name}"

    def model_dir(self, run_name: str) -> str:
        """The model a fine-tuning run exports at its end."""
        return f"{self.run_dir(run_name)}/model"

    def resolved(self) -> PathsConfig:
        """A copy with `{root}` substituted everywhere and local paths made absolute (Ray workers
        run in other directories)."""
        values = {f.name: getattr(self, f.name).replace("{root}", self.root) for f in dataclasses.fields(self)}
        return PathsConfig(**{k: v if not v or v.startswith("s3://") else os.path.abspath(v)
                              for k, v in values.items()})

    def require(self, *names: str) -> None:
        """Fail early, naming the field and path, if a needed local model directory is missing
        (transformers would otherwise take the path for a hub repository id)."""
        for name in names:
            value = getattr(self, name)
            if value and not value.startswith("s3://") and not os.path.exists(value):
                raise FileNotFoundError(f"paths.{name} = {value} does not exist")


@dataclass
class Recipe:
    """Everything one run needs, from the mixture to the evaluation."""

    name: str = "tiny"
    """The recipe's name (the file recipes/<name>.toml)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Where things live."""
    trim: TrimConfig = field(default_factory=TrimConfig)
    """The TRIM configuration used in caching and inference."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The synthetic mixture (tiny recipe only)."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    """Shard stage."""
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    """Precompute stage."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Fine-tune stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluate stage."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "name"}


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert an override string (or TOML value) to the declared type of cls.name."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{where}: unknown key {name!r} (known: {known})")
    target = hints[name]
    if typing.get_origin(target) is typing.Literal:
        target = str
    if not isinstance(value, str) or target is str:
        return value if target is not float or not isinstance(value, int) else float(value)
    if target is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {name}={value!r} is not a boolean")
    try:
        return target(value)
    except ValueError as err:
        raise ValueError(f"{where}: {name}={value!r} is not a {target.__name__}") from err


def _section(name: str, values: dict[str, Any], where: str) -> Any:
    if name == "trim":
        values = dict(values)
        preset = values.pop("preset", "default")
        coerced = {k: _coerce(TrimConfig, k, v, where) for k, v in values.items()}
        return TrimConfig.preset(preset, **coerced)
    cls = typing.get_type_hints(Recipe)[name]
    return cls(**{k: _coerce(cls, k, v, where) for k, v in values.items()})


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load recipes/<name>.toml (or a .toml path), apply `section.key=value` overrides, resolve
    `{root}`. Unknown sections or keys are errors naming the file or override."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
        raise FileNotFoundError(f"recipe {name_or_path!r} not found at {path} (shipped: {shipped})")
    data = tomllib.loads(path.read_text())
    for override in overrides:
        key, sep, value = override.partition("=")
        section, dot, field_name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {override!r}: expected section.key=value")
        data.setdefault(section, {})[field_name] = value.strip()
    unknown = set(data) - set(_SECTIONS) - {"name"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (known: {sorted(_SECTIONS)})")
    sections = {name: _section(name, data.get(name, {}), str(path)) for name in _SECTIONS}
    sections["paths"] = sections["paths"].resolved()
    return Recipe(name=data.get("name", path.stem), **sections)


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
