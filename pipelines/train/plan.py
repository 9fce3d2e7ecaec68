"""What a fine-tuning run is: its step plan, LR schedule, resumable state and the job spec the driver
hands every worker. Pure (no Ray, no DeepSpeed): typed records that travel as JSON-able dicts."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrainConfig
from pipelines.train.order import micro_batches_per_rank, order_rules

WINDOW_MICRO_BATCHES = 8
"""Micro-batches a worker reads from the cache at a time (train_data.micro_batches)."""


@dataclass
class StepPlan:
    """How many optimizer steps the run takes, from the cache size and the batch geometry."""

    samples: int
    """Samples in the cache."""
    micro_batches_per_epoch: int
    """Micro-batches each worker runs per epoch."""
    steps_per_epoch: float
    """Optimizer steps per epoch (micro-batches / accumulation)."""
    total_steps: int
    """Optimizer steps of the whole run."""
    warmup_steps: int
    """Steps of linear warmup."""
    global_batch: int
    """Samples per optimizer step over all workers."""


def plan_steps(samples: int, image_samples: int, cfg: TrainConfig) -> StepPlan:
    """The plan of a cache of `samples`, `image_samples` of them with visual tokens (the manifest's
    visual_samples): each worker runs exactly as many micro-batches an epoch as the epoch's order
    gives it (train_order: every modality's partial micro-batch, then padding to a multiple of the
    workers); global batch = micro-batch x accumulation x workers."""
    micro = micro_batches_per_rank(image_samples, samples - image_samples, cfg.micro_batch_size, cfg.num_workers,
                                   cfg.group_by_length)
    steps_per_epoch = micro / cfg.grad_accum_steps
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return StepPlan(samples=samples, micro_batches_per_epoch=micro, steps_per_epoch=steps_per_epoch,
                    total_steps=total, warmup_steps=int(total * cfg.warmup_ratio),
                    global_batch=cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers)


RESUME_INSENSITIVE = ("run_name", "max_steps", "checkpoint_every", "max_failures", "start_fresh", "preload",
                      "deepspeed_config", "attn_implementation", "gradient_checkpointing")
"""Train settings a resumed run may change: they do not change what is learned from which data."""


CACHE_VERSION = "{cache_version}"
"""The placeholder train.run_name may hold: the finetune job replaces it with the version folder name of
the cache it trains on (TrainConfig.run_name)."""
VERSION_PATTERN = r"v-[0-9a-f]{12}"
"""A version folder's name (pipelines.manifests.version_of)."""


def expand_run_name(template: str, cache_version: str) -> str:
    """train.run_name with {cache_version} replaced by `cache_version`; a name without it as it is. Any
    other brace, or the placeholder twice, is refused: a typo would otherwise name runs."""
    name = template.replace(CACHE_VERSION, cache_version, 1)
    if "{" in name or "}" in name:
        raise ValueError(f"train.run_name {template!r}: the only placeholder it may hold, once, is {CACHE_VERSION}")
    if CACHE_VERSION in template and not re.fullmatch(VERSION_PATTERN, cache_version):
        raise ValueError(f"train.run_name {template!r}: {cache_version!r} is not a cache version (v- and 12 hex "
                         "digits); run precompute again to write a versioned cache")
    return name


def cache_version_of_run(template: str, name: str) -> str | None:
    """The cache version a run called `name` was named after by `template` (one holding {cache_version}),
    None when `name` is not one of the template's runs."""
    prefix, found, suffix = template.partition(CACHE_VERSION)
    if not found:
        return None
    match = re.fullmatch(re.escape(prefix) + f"({VERSION_PATTERN})" + re.escape(suffix), name)
    return match.group(1) if match else None


def run_identity(train: TrainConfig, cache_manifest: dict, llm: str, projector: str) -> dict:
    """The identity a checkpoint records and a resume must match; the cache's version (the hash of all
    it was made from: mixture, images, CLIP weights, settings) is part of it."""
    settings = {k: v for k, v in dataclasses.asdict(train).items() if k not in RESUME_INSENSITIVE}
    cache = {k: cache_manifest.get(k)
             for k in ("version", "encoder", "trim", "samples", "visual_samples", "cache_bytes")}
    return {"cache": cache, "train": settings, "llm": llm, "projector": projector,
            "order": order_rules(train.group_by_length, train.packing)}


RECORDED_SINCE = {"order": 1}
"""Parts of the identity added later, with the value a checkpoint made before was made under."""


def identity_differences(saved: dict | None, current: dict) -> list[str]:
    """The parts of a run's identity that differ (dotted names), [] when they match; a checkpoint
    from before identities were recorded matches anything, and one from before a part's key was
    recorded (cache.version, a new training setting) matches that key; one from before the order's
    rules were recorded was made under the first (RECORDED_SINCE)."""
    if saved is None:
        return []
    out = []
    for part in sorted(set(saved) | set(current)):
        a, b = saved.get(part, RECORDED_SINCE.get(part)), current.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k}" for k in sorted(a) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(part)
    return out


def resume_differences(saved: dict | None, current: dict, step: int, micro_in_epoch: int,
                       plan: StepPlan) -> list[str]:
    """identity_differences of a checkpoint at (step, micro_in_epoch) and a job of `plan`, less the
    order's rules where they decide nothing: at an epoch's end (a checkpoint there holds all of the
    epoch's micro-batches; the next epoch is ordered anew) or at the run's last step."""
    differs = identity_differences(saved, current)
    if micro_in_epoch in (0, plan.micro_batches_per_epoch) or step >= plan.total_steps:
        differs = [d for d in differs if d != "order"]
    return differs


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint, so a resume continues exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epochs finished."""
    micro_in_epoch: int = 0
    """Micro-batches of the current epoch already trained on (skipped on resume)."""
    mlflow_run_id: str | None = None
    """The MLflow run this training logs to (continued on resume)."""
    first_loss: float | None = None
    """The loss of the first step (reported beside the last)."""
    identity: dict | None = None
    """What the run was started with (TrainJob.identity): a resume with anything else is refused."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainJob:
    """Everything a worker needs, built once by the driver (replaces an untyped config dict)."""

    train: TrainConfig
    """The recipe's train section."""
    plan: StepPlan
    """Steps, warmup and batch geometry."""
    llm: str
    """Causal LM checkpoint directory."""
    projector: str
    """Stage-1 projector weights ("" = fresh)."""
    feature_dim: int
    """Width of the cached visual tokens (the projector's input)."""
    deepspeed: dict
    """The DeepSpeed config with its "auto" fields filled."""
    model_settings: dict
    """Recorded in the exported model: TRIM config, encoder, recipe name, feature_dim."""
    tracking_uri: str
    """MLflow tracking URI."""
    experiment: str
    """MLflow experiment name."""
    recipe: dict
    """The whole recipe, logged as params."""
    cache_manifest: dict
    """The cache's manifest, logged as an artifact."""
    run_dir: str
    """Where this run's checkpoints live."""
    export_dir: str
    """Where the final model is written."""
    registered_model: str
    """The name the exported model is registered under in MLflow's model registry."""
    identity: dict
    """What a resumed run must share with its checkpoint: the cache, the training settings that change
    the optimization or the data order, and the number of workers (see run_identity)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        values = dict(data)
        values["train"] = TrainConfig(**values["train"])
        values["plan"] = StepPlan(**values["plan"])
        return cls(**values)
