"""What a fine-tuning run is: its step plan, LR schedule, resumable state and the job spec the driver
hands every worker. Pure (no Ray, no DeepSpeed): typed records that travel as JSON-able dicts."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrainConfig

WINDOW_MICRO_BATCHES = 8
"""Micro-batches per length-grouping window (LLaVA groups within mega-batches the same way)."""


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


def plan_steps(samples: int, cfg: TrainConfig) -> StepPlan:
    """Each worker sees samples // workers rows an epoch (Ray Data's equal split), in windows of
    WINDOW_MICRO_BATCHES micro-batches; global batch = micro-batch x accumulation x workers."""
    per_worker = samples // cfg.num_workers
    window = cfg.micro_batch_size * WINDOW_MICRO_BATCHES
    micro = (per_worker // window) * WINDOW_MICRO_BATCHES + math.ceil((per_worker % window) / cfg.micro_batch_size)
    steps_per_epoch = micro / cfg.grad_accum_steps
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return StepPlan(samples=samples, micro_batches_per_epoch=micro, steps_per_epoch=steps_per_epoch,
                    total_steps=total, warmup_steps=int(total * cfg.warmup_ratio),
                    global_batch=cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers)


RESUME_INSENSITIVE = ("run_name", "max_steps", "checkpoint_every", "max_failures", "start_fresh", "preload",
                      "deepspeed_config", "attn_implementation", "gradient_checkpointing")
"""Train settings a resumed run may change: they do not change what is learned from which data."""


def run_identity(train: TrainConfig, cache_manifest: dict, llm: str, projector: str) -> dict:
    """The identity a checkpoint records and a resume must match."""
    settings = {k: v for k, v in dataclasses.asdict(train).items() if k not in RESUME_INSENSITIVE}
    cache = {k: cache_manifest.get(k) for k in ("encoder", "trim", "samples", "visual_samples", "cache_bytes")}
    return {"cache": cache, "train": settings, "llm": llm, "projector": projector}


def identity_differences(saved: dict | None, current: dict) -> list[str]:
    """The parts of a run's identity that differ (dotted names), [] when they match; a checkpoint
    from before identities were recorded matches anything."""
    if saved is None:
        return []
    out = []
    for part in sorted(set(saved) | set(current)):
        a, b = saved.get(part), current.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(part)
    return out


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
