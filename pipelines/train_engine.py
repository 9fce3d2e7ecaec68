"""Building what a worker trains: the model, its optimizer and schedule inside a DeepSpeed engine;
and writing the final model out. Nothing here loops or logs metrics (see train_worker.fit)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import storage
from pipelines.config import TrainConfig
from pipelines.train_plan import TrainJob, warmup_cosine

logger = logging.getLogger(__name__)


def deepspeed_config(path: str, cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the train config: batch sizes, and
    bf16 on GPU (fp32 on CPU, where bf16 matmuls are slow and gloo has no bf16 all-reduce)."""
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    config["gradient_accumulation_steps"] = cfg.grad_accum_steps
    config["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers
    config.setdefault("bf16", {})["enabled"] = bool(cfg.use_gpu)
    return config


@dataclass
class Built:
    """A worker's trainable parts."""

    model: Any
    """The LlavaTrim module (wrapped by the engine)."""
    tokenizer: Any
    """The LLM's tokenizer (saved with the export)."""
    engine: Any
    """The DeepSpeed engine: forward, backward, step, checkpoints."""
    zero_stage: int
    """ZeRO stage of the engine (3: parameters are partitioned and must be gathered to export)."""

    def lr(self) -> float:
        optimizer = self.engine.optimizer
        return float(optimizer.param_groups[0]["lr"]) if hasattr(optimizer, "param_groups") else 0.0


def build(job: TrainJob) -> Built:
    """Model (LLM + projector), AdamW with warmup-cosine, wrapped in a DeepSpeed engine."""
    import deepspeed
    from transformers import AutoTokenizer

    from trim.model import LlavaTrim

    cfg = job.train
    model = LlavaTrim.from_llm(job.llm, job.feature_dim, job.projector or None, settings=job.model_settings)
    model.set_trainable(cfg.train_llm)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    tokenizer = AutoTokenizer.from_pretrained(job.llm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(job.plan.warmup_steps,
                                                                           job.plan.total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=job.deepspeed)
    return Built(model=model, tokenizer=tokenizer, engine=engine,
                 zero_stage=int(job.deepspeed.get("zero_optimization", {}).get("stage", 0)))


def export(built: Built, destination: str, is_master: bool) -> None:
    """Write the final model directory (gathering ZeRO-3 shards first: every rank must call this) to
    local disk or S3."""
    state = built.engine._zero3_consolidated_16bit_state_dict() if built.zero_stage == 3 else None
    if not is_master:
        return
    with tempfile.TemporaryDirectory() as directory:
        built.model.save(directory, tokenizer=built.tokenizer, state_dict=state)
        fs, path = storage.fsspec_fs(destination)
        if storage.exists(destination):
            fs.rm(path, recursive=True)
        fs.put(directory.rstrip("/") + "/", path, recursive=True)
    logger.info("model written to %s", destination)
