"""What a fine-tuning run is: its step plan, its resumable state and the job spec the driver hands every
worker. Pure (no Ray, no DeepSpeed): typed records that travel as JSON-able dicts."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrainConfig
from pipelines.train.order import micro_batches_per_rank

WINDOW_MICRO_BATCHES = 8
"""Micro-batches a worker reads from the cache at a time (pipelines.train.data.micro_batches)."""


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
    """Steps of linear warmup from 0 (then cosine decay to 0): transformers' cosine schedule with warmup,
    as LLaVA's Trainer runs it (pipelines.train.engine.lr_scheduler)."""
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
    # warmup as LLaVA's Trainer counts it (transformers' TrainingArguments.get_warmup_steps: rounded up)
    return StepPlan(samples=samples, micro_batches_per_epoch=micro, steps_per_epoch=steps_per_epoch,
                    total_steps=total, warmup_steps=math.ceil(total * cfg.warmup_ratio),
                    global_batch=cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers)


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
