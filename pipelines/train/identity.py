"""A run's identity: what a checkpoint records and a resume must match (the cache, the settings that
change what is learned from which data, the order's and the schedule's rules), and what differs."""

from __future__ import annotations

import dataclasses

from pipelines.config import TrainConfig
from pipelines.train.order import order_rules
from pipelines.train.plan import StepPlan

RESUME_INSENSITIVE = ("run_name", "max_steps", "checkpoint_every", "max_failures", "start_fresh", "preload",
                      "deepspeed_config", "attn_implementation", "gradient_checkpointing")
"""Train settings a resumed run may change: they do not change what is learned from which data."""


def run_identity(train: TrainConfig, cache_manifest: dict, llm: str, projector: str) -> dict:
    """The identity a checkpoint records and a resume must match; the cache's version (the hash of all
    it was made from: mixture, images, CLIP weights, settings) is part of it."""
    settings = {k: v for k, v in dataclasses.asdict(train).items() if k not in RESUME_INSENSITIVE}
    cache = {k: cache_manifest.get(k)
             for k in ("version", "encoder", "trim", "samples", "visual_samples", "cache_bytes")}
    return {"cache": cache, "train": settings, "llm": llm, "projector": projector,
            "order": order_rules(train.group_by_length, train.packing), "schedule": SCHEDULE_RULES}


SCHEDULE_RULES = 2
"""The learning-rate schedule's rules, recorded in each checkpoint: 2 is transformers' cosine schedule
with warmup, as LLaVA's Trainer runs it (warmup from 0, its steps rounded up); 1 started warmup at
1/(warmup+1) and rounded its steps down. A run cannot continue under other rules than it began with."""
RECORDED_SINCE = {"order": 1, "schedule": 1}
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
    rules where they decide nothing: the order's at an epoch's end (a checkpoint there holds all of the
    epoch's micro-batches; the next epoch is ordered anew), the order's and the schedule's at the
    run's last step (nothing is left to train)."""
    differs = identity_differences(saved, current)
    if step >= plan.total_steps:
        return [d for d in differs if d not in ("order", "schedule")]
    if micro_in_epoch in (0, plan.micro_batches_per_epoch):
        differs = [d for d in differs if d != "order"]
    return differs
